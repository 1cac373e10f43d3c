"""Where a DNC recall model stands on the way to the lookup: what it writes, and where it reads.

    PYTHONPATH=. python experiments/recall_start_probe.py CHECKPOINT.pt [CHECKPOINT.pt ...]

For each checkpoint (a GPT2_+_DNC one of a recall run with memory_layer > 0), on 64 fresh
one-fact episodes at distance 64 drawn from the run's seed, it replays the memory token by
token with `dnc_step` and reports, at the four answer positions:
- the read weights' mass on the slots the fact's code digits were written to (code mass),
  and on the slot of the very digit being predicted (right mass), summed over the heads;
- the read heads' β^r and the read weights' entropy over the slots (1 = uniform);
- how large the memory's addition read_proj(r) is against the residual stream it joins;
and the write gate by token class. A lookup that has started reads the right slot; one that
has not reads them all alike (experiments/LOG.md, SK).
"""
import json
import math
import random
import sys
from pathlib import Path

import torch

import dnc_gpt2 as D

EPISODES, DISTANCE = 64, 64


def probe_episodes(cfg, tokenizer):
    """One-fact, one-query episodes in the fixed layout, drawn from the run's seed."""
    generator = D.RecallGenerator(tokenizer, cfg.seq_len, cfg.seed, facts=1, queries=1)
    return generator.episodes(random.Random(f"start-probe/{cfg.seed}"), DISTANCE, EPISODES)


def replay(model, episodes, cfg, context=False):
    """Per token of the episodes (B, L): the interface, the read and write weights, and the
    norms of the residual and of read_proj(r), with the state carried over the segments."""
    state, rows = model.memory.initial_state(episodes.ids.shape[0]), []
    for ids, _ in D.episode_segments(episodes, cfg.seq_len):
        h = model.embed(ids[:, :-1])
        for block in model.transformer.h[:model.memory_layer]:
            h = block(h)
        iface = model.memory.interface(model.memory_ln(h), context)
        for t in range(h.shape[1]):
            read, state = D.dnc_step(state, D.DNCInterface(
                *(None if x is None else x[:, t] for x in iface)))
            rows.append(dict(read_weights=state.read_weights, write_weights=state.write_weights,
                             write_gate=iface.write_gate[:, t, 0],
                             read_strengths=iface.read_strengths[:, t],
                             residual=h[:, t].norm(dim=-1),
                             added=model.read_proj(read.flatten(-2)).norm(dim=-1)))
    return {key: torch.stack([row[key] for row in rows], 1) for key in rows[0]}


def start_signals(model, episodes, cfg, context=False):
    """The probe's figures for one model on one-fact episodes (module docstring); context:
    whether the interface reads the earlier tokens, as in training from binding_from on."""
    with torch.no_grad():
        run = replay(model, episodes, cfg, context)
    classes = episodes.classes[:, :-1].long()
    code = D.TOKEN_CLASSES.index("fact code")
    signals = {f"gate {name}": run["write_gate"][classes == i].mean().item()
               for i, name in enumerate(D.TOKEN_CLASSES) if (classes == i).any()}
    code_mass, right_mass, strengths, entropy, ratio = [], [], [], [], []
    for row in range(classes.shape[0]):
        written = run["write_weights"][row, classes[row] == code]  # (4, N): digit j's slots
        answers = episodes.answers[row].nonzero()[:, 0]  # the inputs that predict digit j
        for j, p in enumerate(answers.tolist()):
            reads = run["read_weights"][row, p]  # (R, N)
            code_mass.append((reads @ written.sum(0)).sum().item())
            right_mass.append((reads @ written[j]).sum().item())
            strengths.append(run["read_strengths"][row, p].mean().item())
            entropy.append((-(reads * reads.clamp_min(1e-12).log()).sum(-1)
                            / math.log(reads.shape[-1])).mean().item())
            ratio.append((run["added"][row, p] / run["residual"][row, p]).item())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {**signals, "code mass": mean(code_mass), "right mass": mean(right_mass),
            "read strength": mean(strengths), "read entropy": mean(entropy),
            "added / residual": mean(ratio)}


def load_dnc(path):
    """A saved GPT2 + DNC recall model with memory_layer > 0 and its Config, or a ConfigError."""
    if not Path(path).is_file():
        raise D.ConfigError(f"{path}: no such checkpoint; pass a GPT2_+_DNC_*.pt of a recall run")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    cfg = D.checkpoint_config(checkpoint["config"], path)
    if cfg.dataset != "recall" or not D.memory_below_head(cfg) or not any(
            key.startswith("memory.") for key in checkpoint["model_state_dict"]):
        raise D.ConfigError(f"{path}: not a GPT2 + DNC recall checkpoint with memory_layer > 0; "
                            f"pass the DNC model's checkpoint of a --preset=recall run")
    model = D.build_model(cfg, True)
    model.load_state_dict(checkpoint["model_state_dict"])
    return model.eval(), cfg, checkpoint["global_step"]


def main(argv):
    if not argv:
        print("usage: recall_start_probe.py CHECKPOINT.pt [CHECKPOINT.pt ...]", file=sys.stderr)
        return 2
    tokenizer, results = D.load_tokenizer(), {}
    for path in argv:
        try:
            model, cfg, step = load_dnc(path)
        except D.ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        episodes = probe_episodes(cfg, tokenizer)
        results[path] = {"step": step,
                         **start_signals(model, episodes, cfg, D.binding(cfg, step))}
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

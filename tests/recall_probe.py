"""Probe a recall checkpoint of the DNC model: are GPT-2's hidden states, and the interface
computed from them, still distinct across tokens, and are the reads sharp?

    PYTHONPATH=. python tests/recall_probe.py CHECKPOINT.pt

Prints the mean pairwise cosine similarity over one validation batch of the hidden states and
of the write vectors and keys, the read strength, and the entropy of the final read weights
against that of a uniform read (ln N). The README's collapse diagnosis comes from this.

Then where the memory's content comes from, and where the reads look: each slot's content
is attributed to the token classes that wrote it (a write of weight w adds w to the writing
token's class; every write scales what the slot held by 1 - w * mean(erase)), and at the
positions that predict an answer digit it prints the share of the memory's content written
by fact-code tokens against the share of the reads drawn from it (reads that use the facts
draw more than the memory holds), and how much of what the fact codes wrote is still there.
"""
import math
import sys

import torch
import torch.nn.functional as F

import dnc_gpt2 as D


def mean_cosine(x):
    x = F.normalize(x.flatten(0, -2), dim=-1)
    n = len(x)
    return ((x @ x.T).sum() - n).item() / (n * n - n)


ckpt = torch.load(sys.argv[1], weights_only=True)
cfg = D.Config(**ckpt["config"])
model = D.build_model(cfg, True)
model.load_state_dict(ckpt["model_state_dict"])
model.eval()
task = D.recall_task(cfg, D.load_tokenizer())
episodes = next(iter(task.split("valid", D.distances(cfg.recall_distances)).values()))
state = None
with torch.no_grad():
    for ids, _ in D.episode_segments(episodes, cfg.seq_len):
        h = model.transformer(ids[:, :-1]).last_hidden_state
        iface = model.memory.interface(h)
        _, gate, _, state = model.memory.scan(h, state)
    print(f"cosine: hidden {mean_cosine(h):.3f}, write vector {mean_cosine(iface.write_vector):.3f}"
          f", write key {mean_cosine(iface.write_key):.3f}, read key "
          f"{mean_cosine(iface.read_keys):.3f}")
    weights = state.read_weights
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean().item()
    print(f"read strength {iface.read_strengths.mean():.2f} (max {iface.read_strengths.max():.2f})"
          f"; final read-weight entropy {entropy:.2f} (uniform {math.log(cfg.mem_slots):.2f});"
          f" mean write gate {gate.mean():.3f}")


def provenance(model, episodes, cfg):
    """Per token class: the share of memory content and of the answer positions' reads."""
    kinds = len(D.TOKEN_CLASSES)
    state, owned, rows = None, None, []
    fact = D.TOKEN_CLASSES.index("fact code")
    with torch.no_grad():
        for s, (ids, scored) in enumerate(D.episode_segments(episodes, cfg.seq_len)):
            h = model.transformer(ids[:, :-1]).last_hidden_state
            iface = model.memory.interface(h)
            if state is None:
                state = model.memory.initial_state(ids.shape[0])
                owned = torch.zeros(ids.shape[0], cfg.mem_slots, kinds)
                written = torch.zeros(ids.shape[0], kinds)
            classes = episodes.classes[:, s * cfg.seq_len:(s + 1) * cfg.seq_len]
            for t in range(ids.shape[1] - 1):
                _, state = D.dnc_step(state, D.DNCInterface(
                    *(None if x is None else x[:, t] for x in iface)))
                w = state.write_weights
                owned *= (1 - w * iface.erase_vector[:, t].mean(-1, keepdim=True)).unsqueeze(-1)
                owned += w.unsqueeze(-1) * F.one_hot(classes[:, t].long(), kinds).unsqueeze(1)
                written += w.sum(-1, keepdim=True) * F.one_hot(classes[:, t].long(), kinds)
                share = owned / owned.sum(-1, keepdim=True).clamp_min(1e-12)
                read = (state.read_weights.mean(1).unsqueeze(-1) * share).sum(1)  # (B, kinds)
                held = share.mean(1)
                for b in scored[:, t].nonzero()[:, 0].tolist():
                    kept = owned[b, :, fact].sum() / written[b, fact].clamp_min(1e-12)
                    rows.append((held[b, fact].item(), read[b, fact].item(), kept.item()))
    held, read, kept = (sum(x) / len(rows) for x in zip(*rows))
    print(f"at the {len(rows)} positions predicting an answer digit: fact-code tokens wrote "
          f"{held:.3f} of the memory's content and {read:.3f} of what was read; {kept:.3f} of "
          f"what they wrote is still held")


provenance(model, episodes, cfg)

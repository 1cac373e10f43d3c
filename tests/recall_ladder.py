"""Where does the recall signal die? The DNC model trained on the recall task with one part
of the memory replaced by an oracle, so that each rung of the ladder isolates one stage.

    PYTHONPATH=. python tests/recall_ladder.py MODE STEPS [--field=value ...]

The run starts from `--preset=recall --recall_facts=1 --recall_distances=64
--read_strength_bias=0 --recall_facts_from=0 --recall_queries=0 --recall_queries_from=0
--lr_decay_from=0 --min_lr=0 --recall_shift=false --recall_shift_from=0`, every fact asked,
the fixed layout and a constant learning rate (E14's
setting until the preset gained `tie_embeddings=False` and `allocation_gate_bias=3` after
E27: add `--tie_embeddings=true --allocation_gate_bias=0` to rerun E17-E26); the arguments
after STEPS override it. MODE:

- `memory`: the model as built, no oracle.
- `oracle_answer`: the reads are replaced by the one-hot of the digit to be predicted, at the
  positions that predict an answer digit (zero elsewhere): the perfect lookup. How fast the
  model learns to use it measures the path from a read to the logits alone.
- `oracle_bag`: the reads are replaced by the counts of each digit stated in the facts so far:
  what a read that takes in every fact row, without addressing, could offer.
- `oracle_gate`: the DNC is real, but its write gate is 1 at the facts' code digits and 0 at
  every other token, so the memory holds the facts and nothing else: whether addressing and
  the value path can learn once the writes are right.
- `oracle_digits`: as oracle_gate, with the gate also 1 at the answer digits, so each answer
  digit is written just before the read that predicts the next one: what a gate that selects
  by token kind (digit or not) writes.
- `oracle_e17`: the gate fixed from the first step at E17's learnt mean per token class
  (`E17_GATES`): whether those writes allow a lookup at all, or only came too late.
- `oracle_contrast`: the gate fixed at HIGH at the facts' code digits and LOW at every other
  token (`--gate_contrast=LOW,HIGH`, default 0.3,0.6): how much contrast the lookup needs.

Every 50 steps (every 100 in runs over 1,500 steps) it prints the answer digits' mean NLL
(chance ln 10 = 2.303), exact match, the exact match of each episode's first query alone
(which elimination cannot answer) and the mean write gate by token class, on 128 episodes
of its own stream ("ladder"), neither the validation nor the test split. With `--save_dir=D`
the final model is saved as D/ladder-MODE-STEPS.pt. `--from=D/ladder-MODE-K.pt` continues
that model (with a fresh optimizer) from step K + 1 to STEPS (STEPS < K: only scores it,
e.g. at another `--recall_distances`); `--read_strength_shift=X` adds
X to the bias of every read strength's pre-activation (β^r = 1 + softplus(… + bias)) before
training: an intervention that makes every read sharper. `--gate_speed=K` makes the write
gate learn K times faster under Adam: its row of the interface projection is divided by K
and its pre-activation multiplied by K, so the model computes the same at the start but each
step moves the gate's pre-activation K times as far. `--reinit=PART,...` (with `--from`)
gives these parts of the saved model their initial values again before training: `interface`
(the memory's interface projection), `read_proj`, `trunk` (GPT-2's blocks and embeddings).
"""
import dataclasses
import os
import random
import sys
import time

import torch

import dnc_gpt2 as D

MODES = ("memory", "oracle_answer", "oracle_bag", "oracle_gate", "oracle_digits", "oracle_e17",
         "oracle_contrast")
# the mean write gate by token class that E17 (mode memory, --memory_layer=1) had learnt
# after 3,000 steps; oracle_e17 fixes the gate at these values from the first step
E17_GATES = {"filler": 0.09, "fact name": 0.41, "fact code": 0.84, "fact frame": 0.26,
             "query": 0.40, "answer": 0.93}
PROBE_EPISODES = 128


def oracle_reads(mode, episodes, digits, width):
    """(B, L, width) replacement reads for oracle_answer and oracle_bag."""
    length = episodes.answers.shape[1]
    reads = torch.zeros(*episodes.answers.shape, width)
    fact = episodes.classes[:, :length] == D.TOKEN_CLASSES.index("fact code")
    for value, token in enumerate(digits):
        if mode == "oracle_answer":  # target j is token j + 1
            reads[..., value] = ((episodes.ids[:, 1:] == token) & episodes.answers).float()
        else:
            reads[..., value] = ((episodes.ids[:, :length] == token) & fact).float().cumsum(1)
    return reads


class Oracle:
    """Replaces one stage of the model for the episodes given to `start`, segment by segment."""

    def __init__(self, mode, model, cfg, digits, contrast=(0.3, 0.6)):
        self.mode, self.cfg, self.digits, self.segment = mode, cfg, digits, 0
        self.contrast = contrast
        self.read_and_add, self.interface = model.read_and_add, model.memory.interface
        if mode in ("oracle_answer", "oracle_bag"):
            model.read_and_add = self.oracle_read
        if mode in ("oracle_gate", "oracle_digits", "oracle_e17", "oracle_contrast"):
            model.memory.interface = self.oracle_gate
        self.model = model
        model.transformer.register_forward_pre_hook(self.next_segment)

    def start(self, episodes):
        """The episodes the next forward passes run through, from their first segment."""
        self.segment, seq = -1, self.cfg.seq_len
        classes = episodes.classes[:, :episodes.answers.shape[1]].long()
        if self.mode == "oracle_e17":
            gates = torch.tensor([E17_GATES[name] for name in D.TOKEN_CLASSES])[classes]
        elif self.mode == "oracle_contrast":
            low, high = self.contrast
            gates = low + (high - low) * (classes == D.TOKEN_CLASSES.index("fact code")).float()
        else:
            gates = (classes == D.TOKEN_CLASSES.index("fact code")).float()
            if self.mode == "oracle_digits":
                gates += (classes == D.TOKEN_CLASSES.index("answer")).float()
        self.gates = gates.split(seq, 1)
        width = self.cfg.num_reads * self.cfg.mem_width
        if self.mode in ("oracle_answer", "oracle_bag"):
            self.reads = oracle_reads(self.mode, episodes, self.digits, width).split(seq, 1)

    def oracle_read(self, residual, controller, memory_state):
        x, gate, weights, state = self.read_and_add(residual, controller, memory_state)
        return residual + self.model.read_proj(self.reads[self.segment]), gate, weights, state

    def oracle_gate(self, h):
        return self.interface(h)._replace(write_gate=self.gates[self.segment].unsqueeze(-1))

    def next_segment(self, module, args):
        self.segment += 1


REINIT = {"interface": "memory.interface_proj.", "read_proj": "read_proj.",
          "trunk": "transformer."}


def reinitialise(model, cfg, parts):
    """--reinit: the named parts of a continued model back at a fresh model's values."""
    fresh, state = D.build_model(cfg, True).state_dict(), model.state_dict()
    prefixes = tuple(REINIT[part] for part in parts)
    model.load_state_dict({**state, **{k: v for k, v in fresh.items() if k.startswith(prefixes)}})


def speed_up_gate(model, k):
    """--gate_speed: g^w = σ(K·a) with a's row of the interface projection divided by K."""
    if k == 1:
        return
    memory, row = model.memory, model.memory.write_gate_index
    with torch.no_grad():
        memory.interface_proj.weight[row] /= k
        memory.interface_proj.bias[row] /= k
    interface = memory.interface

    def faster(h):
        iface = interface(h)
        return iface._replace(write_gate=torch.sigmoid(k * torch.logit(iface.write_gate, 1e-6)))
    memory.interface = faster


def ladder_episodes(task, cfg, n):
    """n episodes of the ladder's own stream at the run's longest distance."""
    return task.episodes(random.Random(f"recall/{cfg.seed}/ladder"),
                         max(D.distances(cfg.recall_distances)), n)


def saved_model(path, n, trained=True):
    """(cfg, model in eval mode, task, n ladder episodes) of a model saved with --save_dir;
    trained=False: the same Config's model at its initial values."""
    checkpoint = torch.load(path, weights_only=True)
    cfg = D.Config(**checkpoint["config"])
    model = D.build_model(cfg, True)
    if trained:
        model.load_state_dict(checkpoint["model_state_dict"])
    task = D.recall_task(cfg, D.load_tokenizer())
    return cfg, model.eval(), task, ladder_episodes(task, cfg, n)


def probe(model, oracle, episodes, cfg):
    """Answer NLL per digit, exact match, the first query's exact match and the gate by class
    on the probe episodes."""
    nll, exact, firsts, codes, gates = 0.0, 0, 0, 0, []
    for first in range(0, len(episodes.ids), cfg.batch_size):
        part = D.Episodes(*(x[first:first + cfg.batch_size] for x in episodes))
        oracle.start(part)
        metrics = D.recall_metrics(model, {0: part}, cfg)
        queries = metrics["recall"][0]["queries"]
        nll += metrics["loss"] * queries
        exact += round(metrics["exact"] * queries)
        firsts += round(metrics["recall"][0]["first_query_exact"] * len(part.ids))
        codes += queries
        gates.append(metrics.get("gate_by_class", {}))
    gate = {k: sum(g[k] for g in gates) / len(gates) for k in gates[0]}
    return nll / codes, exact / codes, firsts / len(episodes.ids), gate


def main():
    mode, steps = sys.argv[1], int(sys.argv[2])
    if mode not in MODES:
        sys.exit(f"MODE={mode!r}: choose one of {MODES}")
    ladder = dict(arg[2:].split("=", 1) for arg in sys.argv[3:]
                  if arg.startswith(("--from=", "--read_strength_shift=", "--gate_contrast=",
                                                 "--gate_speed=", "--reinit=")))
    cfg = D.config_from_args(["--preset=recall", "--recall_distances=64", "--recall_facts=1",
                              "--read_strength_bias=0", "--recall_queries=0",
                              "--recall_facts_from=0", "--recall_queries_from=0",
                              "--lr_decay_from=0", "--min_lr=0", "--recall_shift=false",
                              "--recall_shift_from=0",
                              *(arg for arg in sys.argv[3:]
                                if arg[2:].split("=")[0] not in ladder)])
    D.validate_config(cfg)
    task = D.recall_task(cfg, D.load_tokenizer())
    episodes = ladder_episodes(task, cfg, PROBE_EPISODES)
    model, first = D.build_model(cfg, True), 1
    if "from" in ladder:  # continue a saved ladder model (a fresh optimizer), new episodes
        model.load_state_dict(torch.load(ladder["from"], weights_only=True)["model_state_dict"])
        first = int(ladder["from"].rsplit("-", 1)[1].split(".")[0]) + 1
        reinitialise(model, cfg, [p for p in ladder.get("reinit", "").split(",") if p])
    with torch.no_grad():  # an intervention: every read sharper by the same shift
        model.memory.interface_proj.bias[model.memory.read_strength_slice] += float(
            ladder.get("read_strength_shift", 0))
    speed_up_gate(model, float(ladder.get("gate_speed", 1)))
    contrast = tuple(float(x) for x in ladder.get("gate_contrast", "0.3,0.6").split(","))
    oracle = Oracle(mode, model, cfg, task.digits, contrast)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    started, every = time.time(), 50 if steps <= 1500 else 100
    for step in range(first, steps + 1) if first <= steps else [first - 1]:
        if step >= first:  # with --from and STEPS below the checkpoint's: evaluate it only
            batch = task.train_batch(step, cfg.batch_size, D.unlocked_distances(cfg, step),
                                     D.training_queries(cfg, step), D.training_facts(cfg, step))
            segments, masks = zip(*D.episode_segments(batch, cfg.seq_len))
            oracle.start(batch)
            D.set_learning_rate(optimizer, D.learning_rate(cfg, step, steps))
            D.train_step(model, model, optimizer, scaler, list(segments), cfg, D.StopFlag(),
                         torch.device("cpu"), None, D.scored_targets(masks, cfg))
        if step % every == 0 or step == steps or step < first:
            nll, exact, first_query, gate = probe(model, oracle, episodes, cfg)
            print(f"step {step}: answer NLL {nll:.3f} per digit, exact {exact:.3f}, first query "
                  f"{first_query:.3f} "
                  f"({time.time() - started:.0f} s); write gate "
                  + ", ".join(f"{k} {v:.2f}" for k, v in gate.items()), flush=True)
    if any(arg.startswith("--save_dir") for arg in sys.argv):  # for tests/recall_probe.py
        os.makedirs(cfg.save_dir, exist_ok=True)
        torch.save({"config": dataclasses.asdict(cfg), "model_state_dict": model.state_dict()},
                   os.path.join(cfg.save_dir, f"ladder-{mode}-{steps}.pt"))


if __name__ == "__main__":
    main()

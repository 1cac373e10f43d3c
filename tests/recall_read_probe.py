"""Where the reads of a recall model look, for any `memory_layer` (tests/recall_probe.py reads
the last hidden state, so it fits the head design only).

    PYTHONPATH=. python tests/recall_read_probe.py CHECKPOINT.pt

The model runs 16 episodes of the ladder's stream (tests/recall_ladder.py) as in training,
with the DNC's interface captured wherever the model computes it; the scan is then replayed
with `dnc_step`, attributing each slot's content to the token classes that wrote it (as
recall_probe.py does). At the positions that predict an answer digit it prints the fact
codes' share of the memory and of the reads, the read weights' entropy against a uniform
read, the mean read strength β^r, the read weight on the slot written at the same step and
the largest read weight.
"""
import math
import sys

import torch
import torch.nn.functional as F

import dnc_gpt2 as D
from recall_ladder import saved_model  # tests/ is on the path of a script run from it

cfg, model, task, episodes = saved_model(sys.argv[1], 16)
captured, interface = [], model.memory.interface


def capture(h):
    captured.append(interface(h))
    return captured[-1]


model.memory.interface = capture
state = None
with torch.no_grad():
    for ids, _ in D.episode_segments(episodes, cfg.seq_len):
        state = model(ids[:, :-1], memory_state=state).memory_state

kinds, fact, seq = len(D.TOKEN_CLASSES), D.TOKEN_CLASSES.index("fact code"), cfg.seq_len
state = model.memory.initial_state(len(episodes.ids))
owned = torch.zeros(len(episodes.ids), cfg.mem_slots, kinds)
rows = []
for s, iface in enumerate(captured):
    classes = episodes.classes[:, s * seq:(s + 1) * seq].long()
    scored = episodes.answers[:, s * seq:(s + 1) * seq]
    for t in range(seq):
        _, state = D.dnc_step(state, D.DNCInterface(*(x if x is None else x[:, t] for x in iface)))
        w = state.write_weights
        owned *= (1 - w * iface.erase_vector[:, t].mean(-1, keepdim=True)).unsqueeze(-1)
        owned += w.unsqueeze(-1) * F.one_hot(classes[:, t], kinds).unsqueeze(1)
        share = owned / owned.sum(-1, keepdim=True).clamp_min(1e-12)
        for b in scored[:, t].nonzero()[:, 0].tolist():
            read = state.read_weights[b]  # (R, N)
            written = w[b] / w[b].sum().clamp_min(1e-12)
            rows.append((share[b, :, fact].mean().item(),
                         (read.mean(0) * share[b, :, fact]).sum().item(),
                         -(read * read.clamp_min(1e-12).log()).sum(-1).mean().item(),
                         iface.read_strengths[b, t].mean().item(),
                         (read * written).sum(-1).mean().item(),
                         read.max(-1).values.mean().item()))
held, drawn, entropy, strength, own, largest = (sum(x) / len(rows) for x in zip(*rows))
print(f"at {len(rows)} answer positions: fact codes hold {held:.3f} of the memory and give "
      f"{drawn:.3f} of the reads; read entropy {entropy:.2f} (uniform "
      f"{math.log(cfg.mem_slots):.2f}); β^r {strength:.2f}; read weight on this step's write "
      f"{own:.3f}; largest read weight {largest:.2f}")

"""Probe a recall checkpoint of the DNC model: are GPT-2's hidden states, and the interface
computed from them, still distinct across tokens, and are the reads sharp?

    PYTHONPATH=. python tests/recall_probe.py CHECKPOINT.pt

Prints the mean pairwise cosine similarity over one validation batch of the hidden states and
of the write vectors and keys, the read strength, and the entropy of the final read weights
against that of a uniform read (ln N). The README's collapse diagnosis comes from this.
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
task = D.RecallTask(D.load_tokenizer(), cfg.seq_len, cfg.seed, cfg.recall_facts)
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

"""Do the ten code digits stay apart inside a recall model? (README, Results: R0-R4, E27)

    PYTHONPATH=. python tests/recall_digit_probe.py CHECKPOINT.pt [--fresh]

Prints the mean pairwise cosine of the digits' input embeddings (and of their LM-head rows
when the head is untied), and, for the hidden states after block `memory_layer` (what the
memory writes and reads from; the last block for memory_layer=0) at the fact's code digits
and at the answer digits of 32 episodes of the ladder's stream: the mean cosine between any
two of them and the share of their variance that the digit explains (between-digit sum of
squares over the total). With --fresh, the same for the untrained model of the checkpoint's
Config.
"""
import sys

import torch

import dnc_gpt2 as D
from recall_ladder import saved_model  # tests/ is on the path of a script run from it


def mean_pairwise_cosine(x):
    unit = x / x.norm(dim=-1, keepdim=True)
    return ((unit @ unit.T).sum() - len(x)) / (len(x) * (len(x) - 1))


def digit_share_of_variance(x, tokens):
    centred = x - x.mean(0)
    between = sum((tokens == t).sum() * (x[tokens == t].mean(0) - x.mean(0)).pow(2).sum()
                  for t in tokens.unique())
    return between / centred.pow(2).sum()


cfg, model, task, episodes = saved_model(sys.argv[1], 32, trained="--fresh" not in sys.argv)
digits = torch.tensor(task.digits)
line = f"digit embeddings: cosine {mean_pairwise_cosine(model.transformer.wte.weight[digits]):.3f}"
if not cfg.tie_embeddings:
    line += f", LM-head rows {mean_pairwise_cosine(model.lm_head.weight[digits]):.3f}"
print(line)

block = model.transformer.h[(cfg.memory_layer or cfg.num_layers) - 1]
hidden = []
hook = block.register_forward_hook(  # a block returns a tensor or a tuple led by one
    lambda module, args, out: hidden.append(out[0] if isinstance(out, tuple) else out))
state = None
with torch.no_grad():
    for ids, _ in D.episode_segments(episodes, cfg.seq_len):
        state = model(ids[:, :-1], memory_state=state).memory_state
hook.remove()
hidden = torch.cat(hidden, 1)
length = hidden.shape[1]
for kind in ("fact code", "answer"):
    at = episodes.classes[:, :length] == D.TOKEN_CLASSES.index(kind)
    x, tokens = hidden[at].double(), episodes.ids[:, :length][at]
    print(f"block {cfg.memory_layer or cfg.num_layers} at {kind} ({len(x)} tokens): cosine "
          f"{mean_pairwise_cosine(x):.3f}, digit's share of variance "
          f"{digit_share_of_variance(x, tokens):.3f}")

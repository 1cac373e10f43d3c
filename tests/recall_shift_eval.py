"""A saved DNC recall model's test exact match with its task's layout and with recall_shift.

    PYTHONPATH=. python tests/recall_shift_eval.py CHECKPOINT.pt

The same test split as the run's own (seed, distances, 200 queries each), drawn once with
the fixed layout and once shifted: a model whose lookup depends on where the facts sit in
their segment scores well on one and near chance on the other (README, Results: R2, R3).
"""
import dataclasses
import sys

import torch

import dnc_gpt2 as D

checkpoint = torch.load(sys.argv[1], weights_only=True)
cfg = D.Config(**checkpoint["config"])
model = D.build_model(cfg, True)
model.load_state_dict(checkpoint["model_state_dict"])
model.eval()
tokenizer = D.load_tokenizer()
for shift in (False, True):
    layout = dataclasses.replace(cfg, recall_shift=shift)
    test = D.recall_task(layout, tokenizer).split("test", D.distances(cfg.recall_test_distances))
    exact = D.recall_metrics(model, test, layout)["recall"]
    print(f"recall_shift={shift}: " + "  ".join(f"{d}: {exact[d]['exact']:.3f}"
                                                 for d in sorted(exact)))

"""A saved DNC recall model's test exact match with the fixed layout and with recall_shift.

    PYTHONPATH=. python experiments/recall_shift_eval.py CHECKPOINT.pt

The same test split as the run's own (seed, distances, 200 queries each), drawn once with
the fixed layout and once shifted: a model whose lookup depends on where the facts sit in
their segment scores well on one and near chance on the other (experiments/LOG.md: RS2, RS3).
"""
import dataclasses
import sys
from pathlib import Path

import torch

import dnc_gpt2 as D


def exact_by_layout(model, cfg, tokenizer):
    """{shift: {distance: exact match}} on the test split drawn with each layout."""
    result = {}
    for shift in (False, True):
        layout = dataclasses.replace(cfg, recall_shift=shift)
        task = D.RecallTask(layout, D.recall_generator(layout, tokenizer))
        recall = task.evaluate(model, task.test)["recall"]
        result[shift] = {d: recall[d]["exact"] for d in sorted(recall)}
    return result


def main(argv):
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print("usage: recall_shift_eval.py CHECKPOINT.pt (a saved GPT2_+_DNC checkpoint of a "
              "recall run)", file=sys.stderr)
        return 2
    checkpoint = torch.load(argv[0], map_location="cpu", weights_only=True)
    try:
        cfg = D.checkpoint_config(checkpoint["config"], argv[0])
    except D.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if cfg.dataset != "recall" or not any(k.startswith("memory.")
                                          for k in checkpoint["model_state_dict"]):
        print(f"error: {argv[0]}: not a GPT2 + DNC recall checkpoint; pass the DNC model's "
              f"checkpoint of a --preset=recall run", file=sys.stderr)
        return 2
    model = D.build_model(cfg, True)
    model.load_state_dict(checkpoint["model_state_dict"])
    for shift, exact in exact_by_layout(model.eval(), cfg, D.load_tokenizer()).items():
        print(f"recall_shift={shift}: " + "  ".join(f"{d}: {e:.3f}" for d, e in exact.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

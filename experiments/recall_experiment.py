"""One model trained and tested alone: its validation rows and test metrics as JSON.

    PYTHONPATH=. python experiments/recall_experiment.py dnc --preset=recall --seed=6 ...
    PYTHONPATH=. python experiments/recall_experiment.py baseline --preset=cpu,lookup ...

The script itself always trains both models; this trains one, for runs whose other model is
already known (a DNC-only option leaves the baseline unchanged). experiments/LOG.md: E1-E10,
X1-X3, Y1, W4.
"""
import json
import sys
import time

import dnc_gpt2 as D

MODELS = {"baseline": False, "dnc": True}


def train_and_test(cfg, use_dnc):
    """Train one model on cfg's task; its training seconds, validation rows and test metrics."""
    D.validate_config(cfg)
    D.keep_freed_memory()
    task = D.load_task(cfg, D.checked_tokenizer(cfg))
    started = time.time()
    model, history = D.train_model(cfg, use_dnc, task, D.resolve_device(cfg), D.StopFlag())
    return {"train_s": round(time.time() - started),
            "val": [{k: v for k, v in row.items() if k != "recall"} for row in history["val"]],
            "test": task.evaluate(model, task.test)}


def main(argv):
    if not argv or argv[0] not in MODELS:
        print(f"usage: recall_experiment.py {{{','.join(MODELS)}}} [--field=value ...]",
              file=sys.stderr)
        return 2
    try:
        cfg = D.config_from_args(argv[1:])
        D.refuse_to_overwrite(cfg)
        result = train_and_test(cfg, MODELS[argv[0]])
    except D.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

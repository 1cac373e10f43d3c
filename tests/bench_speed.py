"""Speed and memory of GPT-2 + DNC against the baseline, measured in one process.

    python tests/bench_speed.py                      # every case at the default Config
    python tests/bench_speed.py --cases=train --repeats=7
    python tests/bench_speed.py --device=cuda --cases=train,train_compiled --no_peak  # a GPU
    python tests/bench_speed.py --cases=loop,loop_links,loop_small --kernels=fused
    python tests/bench_speed.py --cases=train_small_norouting       # lambda_routing=0

Every model case runs once per --kernels entry (Config.dnc_kernel: fused, eager). The loop
cases time the DNC's scan alone (DNCMemory on random hidden states), forward and
forward + backward, fused against eager, interleaved.

Prints one JSON line per case, then a table. Each ratio compares the two models measured
interleaved (baseline, DNC, baseline, DNC, ...) in the same process, so machine noise hits
both alike. Peak memory is measured in a fresh process per model (two steps), because a
process never gives its peak back. Not collected by pytest: timings are never asserted in tests.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dnc_gpt2  # noqa: E402

WT2_MINI = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wt2-mini"


def peak_rss_mib():
    """Linux: VmHWM, the peak resident set size of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# the recall preset's model, at 8 x 64 tokens (the speed issue's train_small case)
SMALL = dict(hidden_size=128, num_layers=2, num_heads=4, mem_slots=32, mem_width=32,
             num_reads=2, batch_size=8, seq_len=64)


def case_config(case, device="auto", kernel="auto", batch_size=0):
    """train | eval | loop, then optionally _small (recall sizes), _links, _norouting
    (lambda_routing=0, as the recall preset trains: no read-free LM head, no KL), _compiled."""
    sizes = {**(SMALL if "_small" in case else {}),
             **({"batch_size": batch_size} if batch_size else {})}
    return dnc_gpt2.Config(temporal_links="_links" in case,
                           use_compile=case.endswith("_compiled"), compile_mode="default",
                           device=device, dnc_kernel=kernel, **sizes,
                           **({"lambda_routing": 0.0} if "_norouting" in case else {}))


def synchronize(device):
    """CUDA runs asynchronously: a host clock read without this times only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_stepper(cfg, use_dnc, kind):
    """A function doing one train step (forward, backward, AdamW) or one evaluation batch."""
    device = dnc_gpt2.resolve_device(cfg)
    batch = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1),
                          generator=torch.Generator().manual_seed(0)).to(device)
    model = dnc_gpt2.build_model(cfg, use_dnc).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    runner = dnc_gpt2.wrap_for_hardware(model, cfg, device)

    def train_step():
        out = runner(batch[:, :-1])
        loss, _ = dnc_gpt2.compute_loss(out, batch[:, 1:], cfg, use_dnc)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        synchronize(device)

    def eval_step():
        dnc_gpt2.evaluate(runner, [batch])
        synchronize(device)

    return train_step if kind == "train" else eval_step


def time_interleaved(cfg, repeats, kind):
    """Median seconds per step of both models, alternating baseline and DNC."""
    steps = [make_stepper(cfg, use_dnc, kind) for use_dnc in (False, True)]
    first_s, times = [], ([], [])
    for step in steps:  # warm-up: allocator, optimizer state, first-call overheads, compilation
        start = time.perf_counter()
        step()
        first_s.append(time.perf_counter() - start)
    for _ in range(repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - start)
    base, dnc = (statistics.median(t) for t in times)
    tokens = cfg.batch_size * cfg.seq_len
    return {"baseline_s": round(base, 4), "dnc_s": round(dnc, 4), "ratio": round(dnc / base, 3),
            "baseline_tok_s": round(tokens / base, 1), "dnc_tok_s": round(tokens / dnc, 1),
            "repeats": repeats,
            **({"first_step_s": [round(s, 1) for s in first_s]} if cfg.use_compile else {})}


def time_loop(cfg, repeats):
    """The DNC's scan alone at cfg's sizes: median seconds of the forward, and of forward and
    backward, eager and fused interleaved, with the same memory and hidden states."""
    device = dnc_gpt2.resolve_device(cfg)
    torch.manual_seed(0)
    memory = dnc_gpt2.DNCMemory(cfg).to(device)
    h = torch.randn(cfg.batch_size, cfg.seq_len, cfg.hidden_size, device=device,
                    requires_grad=True)

    def forward():
        with torch.no_grad():
            memory(h)
        synchronize(device)

    def forward_backward():
        reads, _, write_weights, _ = memory(h)
        (reads.square().sum() + write_weights.sum()).backward()
        synchronize(device)

    times = {}
    for _ in range(repeats + 1):  # the first round warms up
        for kernel in ("eager", "fused"):
            memory.kernel = kernel
            for name, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
                start = time.perf_counter()
                fn()
                times.setdefault(f"{kernel}_{name}_s", []).append(time.perf_counter() - start)
    result = {k: round(statistics.median(v[1:]), 4) for k, v in times.items()}
    for name in ("fwd", "fwd_bwd"):
        result[f"{name}_speedup"] = round(result[f"eager_{name}_s"] / result[f"fused_{name}_s"], 2)
    return {**result, "repeats": repeats}


def peak_in_fresh_process(case, use_dnc, args):
    """Peak RSS (MiB) of a new process that builds one model and runs two of its steps."""
    command = [sys.executable, __file__, f"--peak_of={case}:{int(use_dnc)}",
               f"--device={args.device}", f"--batch_size={args.batch_size}",
               f"--kernels={args.kernels}"] + (
                  ["--malloc_default"] if args.malloc_default else [])
    return round(float(subprocess.run(command, capture_output=True, text=True,
                                      check=True).stdout.split()[-1]))


def time_data_load():
    """load_data on wt2-mini: first with an empty cache (BPE runs), then from the cache."""
    if not WT2_MINI.is_dir():
        return {"skipped": f"{WT2_MINI} not found"}
    tokenizer = dnc_gpt2.load_tokenizer()
    with tempfile.TemporaryDirectory() as cache:
        cfg = dnc_gpt2.Config(data_dir=str(WT2_MINI), cache_dir=cache)
        start = time.perf_counter()
        streams, _ = dnc_gpt2.load_data(cfg, tokenizer)
        first = time.perf_counter() - start
        start = time.perf_counter()
        dnc_gpt2.load_data(cfg, tokenizer)
        cached = time.perf_counter() - start
    return {"first_s": round(first, 3), "cached_s": round(cached, 3),
            "tokens": sum(len(ids) for ids in streams.values())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cases",
                        default="train,train_links,eval,eval_links,train_small,"
                                "train_small_links,train_small_norouting,train_compiled,loop,"
                                "loop_links,loop_small,"
                                "data_load")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--device", default="auto", help="Config.device: auto, cpu or cuda")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="every case at this batch size; 0 = the case's own")
    parser.add_argument("--kernels", default="fused,eager",
                        help="Config.dnc_kernel values to run each model case with (triton: CUDA)")
    parser.add_argument("--malloc_default", action="store_true",
                        help="leave glibc's malloc as is (dnc_gpt2.main calls keep_freed_memory)")
    parser.add_argument("--no_peak", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--peak_of", help=argparse.SUPPRESS)  # CASE:USE_DNC, in a child process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.malloc_default:
        dnc_gpt2.keep_freed_memory()
    if args.peak_of:
        case, use_dnc = args.peak_of.split(":")
        cfg = case_config(case, args.device, args.kernels.split(",")[0], args.batch_size)
        step = make_stepper(cfg, use_dnc == "1", case.split("_")[0])
        step()
        step()
        cuda = dnc_gpt2.resolve_device(cfg).type == "cuda"
        print(torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib())
        return
    cfg = dnc_gpt2.Config(device=args.device)
    machine = (f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
               f"threads, malloc {'default' if args.malloc_default else 'keep_freed_memory'}, "
               f"{dnc_gpt2.hardware_summary(cfg)}")
    print("# default Config (B=4, T=128, 6 layers, 768 wide, 8 heads, N=64, W=128, R=4); "
          f"_small: the recall preset's model at 8 x 64 tokens; peak: "
          f"{'GPU memory allocated' if dnc_gpt2.resolve_device(cfg).type == 'cuda' else 'RSS'}; "
          + machine)
    results = []
    for case in args.cases.split(","):
        if case == "data_load":
            results.append({"case": case, **time_data_load()})
        elif case.startswith("loop"):
            cfg = case_config(case, args.device)
            results.append({"case": case, **time_loop(cfg, args.repeats)})
        for kernel in args.kernels.split(",") if case.split("_")[0] in ("train", "eval") else []:
            cfg = case_config(case, args.device, kernel, args.batch_size)
            result = time_interleaved(cfg, args.repeats, case.split("_")[0])
            if not args.no_peak and not cfg.use_compile:
                one = argparse.Namespace(**{**vars(args), "kernels": kernel})
                result.update(baseline_peak_rss_mib=peak_in_fresh_process(case, False, one),
                              dnc_peak_rss_mib=peak_in_fresh_process(case, True, one))
            results.append({"case": case, "kernel": kernel, **result})
            print(json.dumps(results[-1]), flush=True)
        if not case.split("_")[0] in ("train", "eval"):
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'case':<16}{'kernel':>7}{'baseline s':>11}{'DNC s':>9}{'ratio':>7}{'DNC tok/s':>11}"
          f"{'peak MiB b/d':>15}")
    for r in results:
        if "ratio" in r:
            peaks = f"{r.get('baseline_peak_rss_mib', '-')}/{r.get('dnc_peak_rss_mib', '-')}"
            print(f"{r['case']:<16}{r['kernel']:>7}{r['baseline_s']:>11.3f}{r['dnc_s']:>9.3f}"
                  f"{r['ratio']:>7.3f}{r['dnc_tok_s']:>11.0f}{peaks:>15}")
        elif "fwd_speedup" in r:
            print(f"{r['case']:<16} DNC scan alone, eager / fused: forward "
                  f"{r['eager_fwd_s']:.4f} / {r['fused_fwd_s']:.4f} s "
                  f"(x{r['fwd_speedup']}), forward + backward {r['eager_fwd_bwd_s']:.4f} / "
                  f"{r['fused_fwd_bwd_s']:.4f} s (x{r['fwd_bwd_speedup']})")
        elif "first_s" in r:
            print(f"{r['case']:<16} first {r['first_s']:.2f} s, cached {r['cached_s']:.3f} s, "
                  f"{r['tokens']:,} tokens")


if __name__ == "__main__":
    main()

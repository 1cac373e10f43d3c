"""Speed and memory of GPT-2 + DNC against the baseline, measured in one process.

    python tests/bench_speed.py                      # every case at the default Config
    python tests/bench_speed.py --cases=train --repeats=7
    python tests/bench_speed.py --cases=train_compiled        # both models with use_compile

Prints one JSON line per case, then a table. Each ratio compares the two models measured
interleaved (baseline, DNC, baseline, DNC, ...) in the same process, so machine noise hits
both alike. Not collected by pytest: timings are never asserted in tests.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dnc_gpt2  # noqa: E402

WT2_MINI = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wt2-mini"


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets VmHWM, the peak resident set size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train_step(model, optimizer, batch, cfg):
    out = model(batch[:, :-1])
    loss, _ = dnc_gpt2.compute_loss(out, batch[:, 1:], cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()


def eval_step(model, batch, cfg):
    dnc_gpt2.evaluate(model, [batch])


def time_interleaved(cfg, repeats, kind):
    """Median seconds per step of both models, alternating; peak RSS of each model's steps."""
    batch = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1),
                          generator=torch.Generator().manual_seed(0))
    models = [dnc_gpt2.build_model(cfg, use_dnc) for use_dnc in (False, True)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=cfg.lr) for m in models]
    runners = [dnc_gpt2.wrap_for_hardware(m, cfg, torch.device("cpu")) for m in models]

    def step(i):
        if kind == "train":
            train_step(runners[i], optimizers[i], batch, cfg)
        else:
            eval_step(runners[i], batch, cfg)

    times, peaks = ([], []), [0.0, 0.0]
    compile_s = []
    for i in (0, 1):  # warm-up: allocator, optimizer state, first-call overheads, compilation
        start = time.perf_counter()
        reset_peak_rss()
        step(i)
        compile_s.append(time.perf_counter() - start)
        peaks[i] = peak_rss_mib()
    for _ in range(repeats):
        for i in (0, 1):
            reset_peak_rss()
            start = time.perf_counter()
            step(i)
            times[i].append(time.perf_counter() - start)
            peaks[i] = max(peaks[i], peak_rss_mib())
    base, dnc = (statistics.median(t) for t in times)
    tokens = cfg.batch_size * cfg.seq_len
    return {"baseline_s": round(base, 4), "dnc_s": round(dnc, 4), "ratio": round(dnc / base, 3),
            "baseline_tok_s": round(tokens / base, 1), "dnc_tok_s": round(tokens / dnc, 1),
            "baseline_peak_rss_mib": round(peaks[0]), "dnc_peak_rss_mib": round(peaks[1]),
            "repeats": repeats,
            **({"first_step_s": [round(s, 1) for s in compile_s]} if cfg.use_compile else {})}


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
    parser.add_argument("--cases", default="train,train_links,eval,eval_links,train_compiled,data_load")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--malloc_default", action="store_true",
                        help="leave glibc's malloc as it is (dnc_gpt2.main calls keep_freed_memory)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.malloc_default:
        dnc_gpt2.keep_freed_memory()
    machine = (f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
               f"threads, malloc {'default' if args.malloc_default else 'keep_freed_memory'}")
    print(f"# default Config (B=4, T=128, 6 layers, 768 wide, 8 heads, N=64, W=128, R=4); {machine}")
    results = []
    for case in args.cases.split(","):
        if case == "data_load":
            result = time_data_load()
        else:
            cfg = dnc_gpt2.Config(temporal_links="_links" in case,
                                  use_compile=case.endswith("_compiled"), compile_mode="default")
            result = time_interleaved(cfg, args.repeats, case.split("_")[0])
        results.append({"case": case, **result})
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'case':<12}{'baseline s':>11}{'DNC s':>9}{'ratio':>7}{'DNC tok/s':>11}"
          f"{'peak MiB b/d':>15}")
    for r in results:
        if "ratio" in r:
            print(f"{r['case']:<12}{r['baseline_s']:>11.3f}{r['dnc_s']:>9.3f}{r['ratio']:>7.3f}"
                  f"{r['dnc_tok_s']:>11.0f}{r['baseline_peak_rss_mib']:>8}/{r['dnc_peak_rss_mib']}")
        elif "first_s" in r:
            print(f"{r['case']:<12} first {r['first_s']:.2f} s, cached {r['cached_s']:.3f} s, "
                  f"{r['tokens']:,} tokens")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Every CUDA path of dnc_gpt2.py run once on one GPU, then the DNC's GPU cost (README, "On a GPU").
#
#   tests/gpu_check.sh OUTDIR        # on a machine with a CUDA GPU; stops by itself within 8 min
#
# Every log, checkpoint and plot goes under OUTDIR; OUTDIR/summary.txt holds one line per step.
# Not collected by pytest. Without a GPU it rehearses the same steps on the CPU in fp32 (the
# plumbing only: bf16, fp16, nccl and CUDA timings need the GPU). Environment: PYTHON (default
# python3), CACHE_DIR (token-id cache; default OUTDIR/cache), BUDGET_S (default 470), ONLY
# (comma-separated step names to run alone, e.g. ONLY=env,dnc_device).
set -uo pipefail
OUT=$(realpath -m "${1:?usage: tests/gpu_check.sh OUTDIR}")
PY=${PYTHON:-python3}
CACHE=${CACHE_DIR:-$OUT/cache}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
deadline=$((SECONDS + ${BUDGET_S:-470}))
export PYTHONUNBUFFERED=1

# step NAME SECONDS COMMAND...: runs COMMAND with a limit that never passes the deadline
step() {
    local name=$1 limit=$2 left=$((deadline - SECONDS)) start=$SECONDS rc
    shift 2
    [[ -z ${ONLY:-} || ",$ONLY," == *",$name,"* ]] || return 0  # ONLY=a,b: those steps alone
    (( limit > left )) && limit=$left
    if (( limit < 10 )); then
        echo "$name: skipped, out of time" | tee -a "$SUMMARY"
        return 124
    fi
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$SUMMARY"
    return $rc
}

note() { [ -n "$*" ] && echo "  $*" | tee -a "$SUMMARY"; }

# the final table of a run's log: two runs of one Config compare through it
final_table() { sed -n '/FINAL COMPARISON/,/^$/p' "$1" | grep -v 'test split'; }
exec 2> >(grep -v 'No such file' >&2)  # steps left out by ONLY leave no logs to read

if $PY -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    GPU=1 DEV=--device=cuda BF16=--precision=bf16 FP16=--precision=fp16
    BENCH="--device=cuda --no_peak --repeats=7"
    EAGER_CASES=train,train_links,eval,eval_links,train_small,train_small_links
    COMPILED_CASES=train_compiled,train_small_compiled
else
    GPU=0 DEV=--device=cpu BF16=--precision=fp32 FP16=--precision=fp32
    BENCH="--device=cpu --no_peak --repeats=2"
    EAGER_CASES=train_small COMPILED_CASES=train_small_compiled
    note "no CUDA GPU: a rehearsal on the CPU in fp32; no CUDA path is exercised"
fi
export OUT PY CACHE DEV BF16
run_args() {  # NAME: the smoke preset with its own checkpoint and plot folders (no spaces)
    echo --preset=smoke $DEV --cache_dir=$CACHE --save_dir=$OUT/$1/ckpt --plot_dir=$OUT/$1/plots
}

step env 60 bash -c "nvidia-smi; $PY -c '
import torch, transformers
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"transformers\",
      transformers.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), \"bf16\", torch.cuda.is_bf16_supported())'"
note "$(grep -E '^torch|NVIDIA|bf16' "$OUT/env.log" | head -3 | tr '\n' ' ')"

# 0. the DNC on the device: its scan equals the CPU's in fp32, and stays fp32 under autocast
cat > "$OUT/dnc_device.py" <<'EOF'
import sys, torch
sys.path.insert(0, ".")
import dnc_gpt2 as D
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
for links in (False, True):
    cfg = D.Config(**D.PRESETS["smoke"], temporal_links=links, device=str(device),
                   precision="bf16" if device.type == "cuda" else "fp32")
    model = D.build_model(cfg, True).eval()
    h = torch.randn(2, 24, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.memory(h)  # the CPU, fp32
        ref64 = model.double().memory(h.double())
        got = model.float().to(device).memory(h.to(device))
        out = model(torch.randint(0, cfg.vocab_size, (2, 24), device=device))
    for name, a, b, c in zip(("reads", "write_gate", "write_weights"), ref, got, ref64):
        err, err64 = (((a - x.cpu().float()).norm() / a.norm()).item() for x in (b, c))
        # w^w depends on the order of nearly tied usages (argsort): rounding alone reorders it,
        # as the CPU's own fp32 against fp64 shows; reads and gates do not
        verdict = "ok" if err < 1e-5 else "see fp64" if name == "write_weights" else "TOO LARGE"
        print(f"links {links}: {name} on {device} vs CPU: rel. error {err:.1e} {verdict} "
              f"(CPU fp32 vs fp64: {err64:.1e})")
    print(f"links {links}: under {model.amp_dtype} autocast: logits {out.logits.dtype}, "
          f"write weights {out.write_weights.dtype}, memory {out.memory_state.memory.dtype}",
          "ok" if out.memory_state.memory.dtype == torch.float32 else "NOT fp32")
EOF
step dnc_device 90 $PY "$OUT/dnc_device.py"
sed 's/^/  /' "$OUT/dnc_device.log" | tee -a "$SUMMARY"

# 0b. the Triton scan against the eager loop on CUDA: the tests' random states and interfaces
# (test_triton_scan.py) at B = 4, T = 16, 40 (across checkpoints) and 128, default and recall
# sizes, links on and off, outputs and every gradient. An untrained DNCMemory is no test: its
# write weights follow nearly tied usages, so fp32 against fp64 on one CPU already differs.
cat > "$OUT/triton_scan.py" <<'EOF'
import os, sys, torch
sys.path[:0] = [".", "tests"]
import dnc_gpt2 as D  # first: its kernels are defined compiled, not interpreted
import test_triton_scan as TT  # its import sets TRITON_INTERPRET for the CPU tests
os.environ["TRITON_INTERPRET"] = "0"
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU: the Triton route is tested in the interpreter by pytest instead")
TT.B = 4  # the helpers' batch size

def error(actual, expected):  # the largest over outputs (or gradients), relative beyond 1
    return max(((a.cpu() - e.cpu()).abs().max() / e.abs().max().clamp_min(1)).item()
               for a, e in zip(actual, expected))

def on(device, fields):
    return type(fields)(*(None if x is None else x.to(device) for x in fields))

for name, (N, W, R) in (("default", (64, 128, 4)), ("recall", (32, 32, 2))):
    for links in (False, True):
        for T in (16, 40, 128):
            state, iface = TT.random_state(1, links, N, W, R), TT.random_interface(2, links, T, W, R)
            gpu = [TT.outputs_and_grads(scan, on("cuda", state), on("cuda", iface))
                   for scan in (D.triton_scan, TT.looped_scan)]
            outs, grads = error(gpu[0][0], gpu[1][0]), error(gpu[0][1], gpu[1][1])
            verdict = "ok"
            if max(outs, grads) >= 1e-4:  # the same inputs through the C++ scan on the CPU
                cpu = [TT.outputs_and_grads(scan, state, iface)
                       for scan in (D.fused_scan, TT.looped_scan)]
                cpp = max(error(cpu[0][0], cpu[1][0]), error(cpu[0][1], cpu[1][1]))
                verdict = (f"near-tied usages: the C++ scan departs too ({cpp:.1e})"
                           if cpp >= 1e-4 else f"TOO LARGE (C++ scan {cpp:.1e})")
            print(f"{name} links {links} T {T}: triton vs eager on CUDA: outputs {outs:.1e}, "
                  f"gradients {grads:.1e} {verdict}", flush=True)
EOF
step triton_scan 150 $PY "$OUT/triton_scan.py"
sed 's/^/  /' "$OUT/triton_scan.log" | tee -a "$SUMMARY"

# 1-2. mixed precision: bf16 autocast, then fp16 with its GradScaler saved in the checkpoints
step smoke_bf16 120 $PY dnc_gpt2.py $(run_args smoke_bf16) $BF16
note "$(grep -m1 '^data:' "$OUT/smoke_bf16.log")"
step smoke_fp16 120 $PY dnc_gpt2.py $(run_args smoke_fp16) $FP16
$PY - "$OUT" "$GPU" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import math, sys, torch
from pathlib import Path
out, gpu = Path(sys.argv[1]), sys.argv[2] == "1"
for run, scaled in (("smoke_bf16", False), ("smoke_fp16", gpu)):
    for path in sorted((out / run / "ckpt").glob("*.pt")):
        state = torch.load(path, weights_only=True, map_location="cpu")["scaler_state_dict"]
        ok = (bool(state) == scaled) and (not scaled or math.isfinite(state["scale"]))
        print(f"  {'ok' if ok else 'WRONG'} {run}/{path.name}: GradScaler state {state or 'none'}")
EOF

# 3. DDP through torchrun with one process (nccl on a GPU)
step torchrun 120 $PY -m torch.distributed.run --standalone --nproc_per_node=1 dnc_gpt2.py \
    $(run_args torchrun) $BF16
note "$(grep -m1 '^data:' "$OUT/torchrun.log")"

# 4. SIGTERM while the DNC model trains, then --resume=true; the same Config as smoke_bf16
sigterm_resume() {
    local ckpt=$OUT/sigterm/ckpt pid rc
    $PY dnc_gpt2.py $(run_args sigterm) $BF16 > "$OUT/sigterm_first.log" 2>&1 &
    pid=$!
    while kill -0 $pid 2> /dev/null && [ ! -e "$ckpt/GPT2_+_DNC_step8.pt" ]; do sleep 0.05; done
    kill -TERM $pid 2> /dev/null
    wait $pid
    rc=$?
    echo "first run: exit $rc (143 = stopped by SIGTERM)"
    grep -a -E '^(interrupted|resume with)' "$OUT/sigterm_first.log"
    [ $rc -eq 143 ] || return 1
    $PY dnc_gpt2.py $(run_args sigterm) $BF16 --resume=true
}
export -f run_args sigterm_resume
step sigterm_resume 150 bash -c sigterm_resume
note "$(grep -m1 'first run' "$OUT/sigterm_resume.log")"
if [ ! -s "$OUT/sigterm_resume.log" ] || [ ! -s "$OUT/smoke_bf16.log" ]; then
    :  # one of the two runs did not run: nothing to compare
elif diff <(final_table "$OUT/smoke_bf16.log") <(final_table "$OUT/sigterm_resume.log") \
        > "$OUT/sigterm_vs_uninterrupted.diff"; then
    note "resumed run's final table = the uninterrupted smoke_bf16 run's, digit for digit"
else
    note "resumed run's final table differs from smoke_bf16 (sigterm_vs_uninterrupted.diff)"
fi

# 4b. the recall preset's own paths (episodes, answer-only loss, recall metrics) on the device,
# and its speed there: 100 steps of one fact at distance 64, tested at 64 and 256
step recall 300 $PY dnc_gpt2.py --preset=recall $DEV --max_steps=100 --save_every_steps=50 \
    --recall_test_distances=64,256 --cache_dir=$CACHE --save_dir=$OUT/recall/ckpt \
    --plot_dir=$OUT/recall/plots
note "$(grep -a -m1 '^data:' "$OUT/recall.log")"
tr '\r' '\n' < "$OUT/recall.log" 2> /dev/null | grep -a -E '100/100 \[' | sort -s -u -t: -k1,1 \
    | sed 's/^/  /' | tee -a "$SUMMARY"
grep -a -E '^ *(64|256) |write gate by token class' "$OUT/recall.log" 2> /dev/null \
    | sed 's/^/  /' | tee -a "$SUMMARY"

# 5. speed: both models interleaved in one process, eager, then the Triton route (on a GPU),
# also at the recall preset's large batch (B = 256)
step bench_eager 150 $PY tests/bench_speed.py $BENCH --cases=$EAGER_CASES --kernels=eager
if [ "$GPU" = 1 ]; then
    step bench_triton 200 $PY tests/bench_speed.py $BENCH --cases=$EAGER_CASES --kernels=triton
    step bench_triton_b256 90 $PY tests/bench_speed.py $BENCH --cases=train_small_norouting \
        --kernels=triton --batch_size=256
fi

# 6. torch.compile: the smoke pipeline, then the compiled speed cases
step smoke_compile 150 $PY dnc_gpt2.py $(run_args smoke_compile) $BF16 --use_compile=true
step bench_compiled 200 $PY tests/bench_speed.py $BENCH --cases=$COMPILED_CASES

for log in bench_eager bench_triton bench_triton_b256 bench_compiled; do
    grep -A20 '^case' "$OUT/$log.log" 2> /dev/null | sed 's/^/  /' | tee -a "$SUMMARY"
done
for log in "$OUT"/*.log; do  # a traceback anywhere is worth reading first
    grep -q '^Traceback' "$log" && note "traceback in $(basename "$log"): $(grep -a -m1 -E \
        '^[A-Za-z_.]*(Error|Exception)' "$log")"
done
echo "total $SECONDS s" | tee -a "$SUMMARY"

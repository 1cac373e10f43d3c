"""Compile both Triton scan kernels for a Hopper GPU (sm_90a) without one, and report each
kernel's registers and spills from ptxas -v, as JSON lines:

    python tests/triton_compile_report.py            # the default sizes and the recall sizes

Run without TRITON_INTERPRET. Pointer arguments are marked 16-byte aligned, as the launcher
marks torch's allocations; num_warps is the one TritonScan launches with.
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import dnc_gpt2 as D  # noqa: E402

SIZES = {"default": (64, 128, 4, True), "recall": (32, 32, 2, False)}  # N, W, R, links


def ptxas_report(ptx):
    """Registers, spill stores and loads (bytes) and stack frame (bytes) of a PTX kernel."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder, "kernel.ptx")
        source.write_text(ptx)
        log = subprocess.run(
            [get_ptxas(90).path, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
             str(source), "-o", str(Path(folder, "kernel.o"))],
            capture_output=True, text=True, check=True).stderr
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    return dict(registers=int(re.search(r"Used (\d+) registers", log).group(1)),
                spill_stores=int(stores), spill_loads=int(loads),
                stack=int(re.search(r"(\d+) bytes stack frame", log).group(1)))


def compile_kernel(kernel, N, W, R, links):
    meta = dict(N=N, W=W, R=R, NB=triton.next_power_of_2(N), WB=triton.next_power_of_2(W),
                RB=triton.next_power_of_2(R), LINKS=links)
    constexprs = dict(meta, STATE=D._state_numel(meta))
    if "SAVED" in kernel.arg_names:
        constexprs["SAVED"] = D._saved_numel(meta)
    scalars = {"T": "i32", "C": "i32", "eps": "fp32"}
    signature = {name: "constexpr" if name in constexprs else scalars.get(name, "*fp32")
                 for name in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if signature[name] == "*fp32"}
    warps = D._num_warps(meta)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, aligned),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    return dict(num_warps=warps, **ptxas_report(compiled.asm["ptx"]))


def main():
    for size, (N, W, R, links) in SIZES.items():
        for kernel in (D._scan_forward_kernel, D._scan_backward_kernel):
            report = compile_kernel(kernel, N, W, R, links)
            print(json.dumps(dict(size=size, N=N, W=W, R=R, links=links,
                                  kernel=kernel.__name__, **report)), flush=True)


if __name__ == "__main__":
    main()

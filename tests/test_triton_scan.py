"""The Triton scan against the eager loop of dnc_step and the C++ scan, in Triton's CPU
interpreter; and a compile of both kernels for Hopper (sm_90a), which needs no GPU."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported or any kernel is defined

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import dnc_gpt2 as D  # noqa: E402
from test_dnc import looped_scan  # noqa: E402  (the reference: dnc_step token by token)

# no silent skip: these tests are how the GPU kernels are checked on a machine without a GPU
assert D.triton is not None, f"the Triton scan's tests need Triton: {D.TRITON_INSTALL}"

B = 2
LINKS = pytest.mark.parametrize("links", [False, True], ids=["nolinks", "links"])


def random_interface(seed, links, T, W, R, dtype=torch.float32):
    """Activated interface fields (B, T, ...), none zero; gates spread wide (scale 3) so that
    writes, frees and allocation change from token to token."""
    gen = torch.Generator().manual_seed(seed)

    def n(*shape):
        return torch.randn(B, T, *shape, generator=gen, dtype=torch.float64)

    fields = D.DNCInterface(
        write_key=n(W), write_strength=1 + F.softplus(n(1)), erase_vector=torch.sigmoid(n(W)),
        write_vector=n(W), free_gates=torch.sigmoid(3 * n(R)),
        allocation_gate=torch.sigmoid(3 * n(1)), write_gate=torch.sigmoid(3 * n(1)),
        read_keys=n(R, W), read_strengths=1 + F.softplus(n(R)),
        read_modes=torch.softmax(n(R, 3), -1) if links else None)
    return D.DNCInterface(*(None if x is None else x.to(dtype) for x in fields))


def random_state(seed, links, N, W, R, dtype=torch.float32):
    """A non-zero state as a run could reach it: usages in (0, 1), weightings summing below 1,
    read weights normalised, links with zero diagonal and row and column sums below 1."""
    gen = torch.Generator().manual_seed(seed)

    def weighting(*shape, total=0.9):
        return total * torch.softmax(torch.randn(*shape, generator=gen, dtype=torch.float64), -1)

    link = precedence = None
    if links:
        link = torch.rand(B, N, N, generator=gen, dtype=torch.float64) / N
        link = link * (1 - torch.eye(N, dtype=torch.float64))
        precedence = weighting(B, N, total=0.8)
    fields = D.DNCState(
        memory=torch.randn(B, N, W, generator=gen, dtype=torch.float64),
        usage=0.01 + 0.98 * torch.rand(B, N, generator=gen, dtype=torch.float64),
        write_weights=weighting(B, N), read_weights=weighting(B, R, N, total=1.0),
        link=link, precedence=precedence)
    return D.DNCState(*(None if x is None else x.to(dtype) for x in fields))


def present(fields):
    return [x for x in fields if x is not None]


def leaves(fields):
    return type(fields)(*(None if x is None else x.detach().clone().requires_grad_()
                          for x in fields))


def outputs(scan, state, iface):
    reads, write_weights, final = scan(state, iface)
    assert (final.link is None) == (state.link is None)
    return [reads, write_weights, *present(final)]


def upstream(outs, seed=0):
    """A random gradient on every output: reads, write weights and the final state."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs]


def outputs_and_grads(scan, state, iface):
    """The outputs, then the gradients of every interface and state input under upstream()."""
    state, iface = leaves(state), leaves(iface)
    outs = outputs(scan, state, iface)
    loss = sum((o * g).sum() for o, g in zip(outs, upstream(outs)))
    grads = torch.autograd.grad(loss, present(iface) + present(state))
    return [o.detach() for o in outs], list(grads)


def assert_all_close(actual, expected, tolerance=1e-5):
    """Each pair within tolerance, absolute up to magnitude 1, relative to the largest
    magnitude beyond (gradients reach ~10)."""
    assert len(actual) == len(expected)
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, k
        assert e.abs().max() > 0, k  # every compared quantity carries signal
        error = (a - e).abs().max().item()
        assert error <= tolerance * max(1.0, e.abs().max().item()), (k, error)


# N, W, R: powers of two and not (padded blocks with masks)
SIZES = pytest.mark.parametrize("N,W,R", [(16, 8, 2), (32, 16, 4), (12, 6, 3)],
                                ids=["N16W8R2", "N32W16R4", "N12W6R3"])


@SIZES
@LINKS
def test_forward_equals_eager_and_cpp_scans(N, W, R, links):
    """Reads, write weights and the final state within 1e-5 (relative to the largest value)
    of the eager loop and of the C++ scan (FusedScan)."""
    state, iface = random_state(1, links, N, W, R), random_interface(2, links, 5, W, R)
    with torch.no_grad():
        triton_out = outputs(D.triton_scan, state, iface)
        assert_all_close(triton_out, outputs(looped_scan, state, iface))
        assert_all_close(triton_out, outputs(D.fused_scan, state, iface))


@pytest.mark.parametrize("N,W,R", [(16, 8, 3), (12, 6, 1)], ids=["N16W8R3", "N12W6R1"])
@LINKS
def test_gradients_equal_eager_autograd(N, W, R, links):
    """The gradient of every interface field of every token and of every initial-state field,
    with random upstream gradients on the reads, the write weights and the final state (the
    carried-memory path), within 1e-5 of autograd through the eager loop, and of the C++
    scan's backward."""
    state, iface = random_state(3, links, N, W, R), random_interface(4, links, 5, W, R)
    outs, grads = outputs_and_grads(D.triton_scan, state, iface)
    eager_outs, eager_grads = outputs_and_grads(looped_scan, state, iface)
    assert len(grads) == 9 + links + 4 + 2 * links
    assert_all_close(outs, eager_outs)
    assert_all_close(grads, eager_grads)
    assert_all_close(grads, outputs_and_grads(D.fused_scan, state, iface)[1])


USAGES = {
    "all_zero": [0.0] * 16,  # a fresh memory: every usage tied
    "tied": [0.5, 0.25, 0.5, 0.25, 0.75, 0.5, 0.25, 0.125] * 2,
    "zeros_and_ones": [1.0, 0.0, 0.5, 1.0, 0.0, 0.25, 1.0, 0.0, 0.75, 0.0, 1.0, 0.5, 0.0, 0.25,
                       1.0, 0.5],
    "all_one": [1.0] * 16,
}


@pytest.mark.parametrize("case", USAGES)
def test_allocation_at_ties_and_extreme_usages(case):
    """allocation_weights at crafted usages, through the scan: with no previous write or
    read, update_usage leaves the usages exactly as given, and with both gates at 1 the write
    weights are the allocation itself. Equal usages go in slot order as torch.sort(stable=True)
    puts them; the gradient of the usages (sorted order fixed) is eager autograd's."""
    N, W, R = 16, 8, 2
    state = random_state(5, False, N, W, R)
    usage = torch.tensor([USAGES[case], USAGES[case][::-1]])
    state = state._replace(usage=usage, write_weights=torch.zeros(B, N),
                           read_weights=torch.zeros(B, R, N))
    iface = random_interface(6, False, 1, W, R)
    iface = iface._replace(allocation_gate=torch.ones(B, 1, 1), write_gate=torch.ones(B, 1, 1))
    expected = D.allocation_weights(usage)
    if case == "all_zero":
        assert expected[0, 0] == 1 and expected[0, 1:].abs().max() == 0
    with torch.no_grad():
        allocation = D.triton_scan(state, iface)[1][:, 0]
    torch.testing.assert_close(allocation, expected, rtol=1e-6, atol=1e-7)
    _, grads = outputs_and_grads(D.triton_scan, state, iface)
    _, eager_grads = outputs_and_grads(looped_scan, state, iface)
    usage = len(present(iface)) + 1  # the index of the usage's gradient: memory's, then it
    assert eager_grads[usage].abs().max() > 0
    torch.testing.assert_close(grads[usage], eager_grads[usage], rtol=1e-5, atol=1e-6)


def test_directional_derivative_against_a_float64_central_difference():
    """The fp32 kernel's gradients, dotted with a random direction over every input, against a
    float64 central difference of the eager loop's loss along that direction: a check of the
    backward that does not lean on autograd's own rules."""
    N, W, R, T = 16, 8, 3, 4
    state64 = random_state(7, True, N, W, R, torch.float64)
    iface64 = random_interface(8, True, T, W, R, torch.float64)
    inputs64 = present(iface64) + present(state64)
    gen = torch.Generator().manual_seed(9)
    direction = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in inputs64]
    weights = upstream(outputs(looped_scan, state64, iface64), seed=10)

    def loss64(step):
        moved = iter(x + step * d for x, d in zip(inputs64, direction))
        iface = D.DNCInterface(*(None if x is None else next(moved) for x in iface64))
        state = D.DNCState(*(None if x is None else next(moved) for x in state64))
        with torch.no_grad():
            return sum((o * w).sum() for o, w in zip(outputs(looped_scan, state, iface), weights))

    h = 1e-6
    expected = ((loss64(h) - loss64(-h)) / (2 * h)).item()
    state32 = leaves(D.DNCState(*(None if x is None else x.float() for x in state64)))
    iface32 = leaves(D.DNCInterface(*(None if x is None else x.float() for x in iface64)))
    outs = outputs(D.triton_scan, state32, iface32)
    loss = sum((o * w.float()).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, present(iface32) + present(state32))
    terms = [g.double() * d for g, d in zip(grads, direction)]
    actual = sum(x.sum() for x in terms).item()
    scale = sum(x.abs().sum() for x in terms).item()  # what fp32 rounding is relative to
    print(f"directional derivative: kernel {actual:.9f}, float64 difference {expected:.9f}, "
          f"sum of |terms| {scale:.3f}")
    assert abs(expected) > 1e-3 * scale
    assert abs(actual - expected) <= 1e-7 * scale, (actual, expected, scale)


@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_gradients_do_not_depend_on_the_checkpoint_interval(T, monkeypatch):
    """With C = 2: one token, T = C, T = C + 1 and T = 5 (a last chunk shorter than C): the
    outputs and all gradients equal those of one chunk (C = T) and the eager loop's."""
    N, W, R = 16, 8, 2
    state, iface = random_state(11, True, N, W, R), random_interface(12, True, T, W, R)
    results = {}
    for chunk in (2, T):
        monkeypatch.setattr(D, "TRITON_SCAN_CHUNK", chunk)
        results[chunk] = outputs_and_grads(D.triton_scan, state, iface)
    eager = outputs_and_grads(looped_scan, state, iface)
    for k, (a, b) in enumerate(zip(sum(results[2], []), sum(results[T], []))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=str(k))
    assert_all_close(sum(results[2], []), sum(eager, []))


@LINKS
def test_non_contiguous_interface_and_state_views(links):
    """The interface as slices of one projection's output and a state of transposed and
    strided views give the outputs and gradients (through the views, onto their bases) of
    contiguous copies; so do upstream gradients of stride 0 (from .sum())."""
    N, W, R, T = 16, 8, 2, 3
    state, iface = random_state(13, links, N, W, R), random_interface(14, links, T, W, R)
    widths = [x[0, 0].numel() for x in present(iface)] + [5]
    projection = torch.cat([x.reshape(B, T, -1) for x in present(iface)]
                           + [torch.randn(B, T, 5)], -1)  # one wide (B, T, ...) output
    memory_t = state.memory.transpose(1, 2).contiguous()  # the memory: its transpose's view
    usages = torch.stack([state.usage, 1 - state.usage], -1)  # the usage: every second value

    def run(copy, expanded_upstream=False):
        bases = [x.clone().requires_grad_() for x in (projection, memory_t, usages)]
        parts = list(bases[0].split(widths, -1))
        i = D.DNCInterface(*(None if x is None else parts.pop(0).unflatten(-1, x.shape[2:])
                             for x in iface))
        s = state._replace(memory=bases[1].transpose(1, 2), usage=bases[2][..., 0])
        assert not any(x.is_contiguous() for x in present(i) + [s.memory, s.usage])
        if copy:
            i = D.DNCInterface(*(None if x is None else x.contiguous() for x in i))
            s = D.DNCState(*(None if x is None else x.contiguous() for x in s))
        outs = outputs(D.triton_scan, s, i)
        if expanded_upstream:
            loss = sum(o.sum() for o in outs)
        else:
            loss = sum((o * torch.ones_like(o)).sum() for o in outs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, bases))

    expected = run(copy=True)
    for actual in (run(copy=False), run(copy=True, expanded_upstream=True)):
        for k, (x, y) in enumerate(zip(actual, expected)):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=str(k))


def test_kernels_compile_for_hopper_and_report_registers_and_spills():
    """Both kernels compile for sm_90a (no GPU needed; Triton's GPU compiler is stricter than
    the interpreter, e.g. about loop-carried types) at the default sizes (N 64, W 128, R 4,
    links) and the recall sizes (N 32, W 32, R 2, no links); prints ptxas's registers and
    spills, which stay small."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    run = subprocess.run([sys.executable, str(HERE / "triton_compile_report.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(reports) == 4
    for r in reports:
        print(f"{r['size']:8} {r['kernel']:22} num_warps {r['num_warps']:2}  registers "
              f"{r['registers']:3}  spill stores {r['spill_stores']:4} B  spill loads "
              f"{r['spill_loads']:4} B")
        assert r["registers"] <= 255
        assert r["spill_stores"] <= 1024 and r["spill_loads"] <= 1024
        if r["size"] == "recall" or "forward" in r["kernel"]:
            assert r["spill_stores"] == 0

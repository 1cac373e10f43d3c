"""DNC memory tests: every mechanism and the whole step against a naive float64 reference,
the invariants of the paper (Graves et al. 2016), and the DNCMemory module's time loop.

The reference below is written from the equations in the API contract with plain Python
loops over one batch element, so it shares no vectorisation (and no bugs of one) with
dnc_gpt2.py.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dnc_gpt2 as D

B, N, W, R = 3, 7, 5, 3
SEEDS = [0, 1, 2, 3]
TOL = 1e-6
LINKS = pytest.mark.parametrize("links", [False, True], ids=["links_off", "links_on"])
KERNELS = pytest.mark.parametrize("kernel", ["eager", "fused"])  # dnc_kernel of the scan
STATE_FIELDS = ["memory", "usage", "write_weights", "read_weights", "link", "precedence"]


# ----------------------------------------------------------------------------------------
# Naive reference: one batch element, nested lists of floats / float64 arrays, explicit loops
# ----------------------------------------------------------------------------------------

def naive_softmax(x):
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


def naive_cosine(a, b):
    dot = sum(a[k] * b[k] for k in range(len(a)))
    na = math.sqrt(sum(v * v for v in a))
    nb = math.sqrt(sum(v * v for v in b))
    return dot / (na * nb + D.COSINE_EPS)


def naive_content(memory, key, strength):
    """softmax over slots of strength * cosine(key, M_i)."""
    return naive_softmax([strength * naive_cosine(key, row) for row in memory])


def naive_usage(usage, ww_prev, wr_prev, free_gates):
    out = []
    for i in range(len(usage)):
        psi = 1.0
        for r in range(len(free_gates)):
            psi *= 1.0 - free_gates[r] * wr_prev[r][i]
        out.append((usage[i] + ww_prev[i] - usage[i] * ww_prev[i]) * psi)
    return out


def naive_allocation(usage):
    a = [0.0] * len(usage)
    prod = 1.0
    for j in sorted(range(len(usage)), key=lambda i: usage[i]):  # free list, least used first
        a[j] = (1.0 - usage[j]) * prod
        prod *= usage[j]
    return a


def naive_write_weighting(alloc, content, alloc_gate, write_gate):
    return [write_gate * (alloc_gate * alloc[i] + (1.0 - alloc_gate) * content[i])
            for i in range(len(alloc))]


def naive_write_memory(memory, ww, erase, vec):
    return [[memory[i][k] * (1.0 - ww[i] * erase[k]) + ww[i] * vec[k]
             for k in range(len(erase))] for i in range(len(memory))]


def naive_links(link, prec, ww):
    n = len(ww)
    new_link = [[0.0 if i == j else (1.0 - ww[i] - ww[j]) * link[i][j] + ww[i] * prec[j]
                 for j in range(n)] for i in range(n)]
    total = sum(ww)
    new_prec = [(1.0 - total) * prec[i] + ww[i] for i in range(n)]
    return new_link, new_prec


def naive_directional(link, read_weights):
    n = len(link)
    fwd = [[sum(link[i][j] * w[j] for j in range(n)) for i in range(n)] for w in read_weights]
    bwd = [[sum(link[j][i] * w[j] for j in range(n)) for i in range(n)] for w in read_weights]
    return fwd, bwd


def naive_read(memory, read_weights):
    return [[sum(memory[i][k] * w[i] for i in range(len(memory))) for k in range(len(memory[0]))]
            for w in read_weights]


def naive_step(s, x, links):
    """Contract steps 1-8 for one batch element; s, x: dicts of float64 arrays."""
    usage = naive_usage(s["usage"], s["write_weights"], s["read_weights"], x["free_gates"])
    alloc = naive_allocation(usage)
    content_w = naive_content(s["memory"], x["write_key"], x["write_strength"][0])  # OLD memory
    ww = naive_write_weighting(alloc, content_w, x["allocation_gate"][0], x["write_gate"][0])
    memory = naive_write_memory(s["memory"], ww, x["erase_vector"], x["write_vector"])
    new = dict(memory=memory, usage=usage, write_weights=ww, link=None, precedence=None)
    if links:
        new["link"], new["precedence"] = naive_links(s["link"], s["precedence"], ww)
        fwd, bwd = naive_directional(new["link"], s["read_weights"])  # previous read weights
    read_weights = []
    for r in range(len(x["read_strengths"])):
        c = naive_content(memory, x["read_keys"][r], x["read_strengths"][r])  # NEW memory
        if links:
            pi = x["read_modes"][r]
            c = [pi[0] * bwd[r][j] + pi[1] * c[j] + pi[2] * fwd[r][j] for j in range(len(c))]
        read_weights.append(c)
    new["read_weights"] = read_weights
    return naive_read(memory, read_weights), new


def per_batch(fn, *arrays):
    """Apply a one-element naive function to each batch element; stack each output."""
    outs = [fn(*(a[b] for a in arrays)) for b in range(len(arrays[0]))]
    if isinstance(outs[0], tuple):
        return tuple(np.array([o[i] for o in outs]) for i in range(len(outs[0])))
    return np.array(outs)


# ----------------------------------------------------------------------------------------
# Random inputs (numpy float64) and conversion to the torch API
# ----------------------------------------------------------------------------------------

def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def oneplus(x):
    return 1.0 + np.log1p(np.exp(x))


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def random_weighting(rng, *shape):
    """Non-negative weights over the last axis summing to a random total in (0.3, 0.95)."""
    w = rng.random(shape)
    return w / w.sum(-1, keepdims=True) * rng.uniform(0.3, 0.95, shape[:-1] + (1,))


def random_memory(rng):
    m = rng.standard_normal((B, N, W))
    m[:, 0] *= 1e-3  # a near-zero row: the cosine's epsilon placement then shows in the result
    return m


def random_state(rng, links):
    link = None
    if links:
        link = rng.random((B, N, N)) / N  # row and column sums < 1, as in a reachable state
        link[:, np.arange(N), np.arange(N)] = 0.0
    return dict(memory=random_memory(rng), usage=rng.uniform(0.01, 0.99, (B, N)),
                write_weights=random_weighting(rng, B, N),
                read_weights=np_softmax(2 * rng.standard_normal((B, R, N))),
                link=link, precedence=random_weighting(rng, B, N) if links else None)


def random_interface(rng, links, gate_scale=1.0):
    n = rng.standard_normal
    return dict(write_key=n((B, W)), write_strength=oneplus(n((B, 1))),
                erase_vector=sigmoid(n((B, W))), write_vector=n((B, W)),
                free_gates=sigmoid(gate_scale * n((B, R))),
                allocation_gate=sigmoid(gate_scale * n((B, 1))),
                write_gate=sigmoid(gate_scale * n((B, 1))),
                read_keys=n((B, R, W)), read_strengths=oneplus(n((B, R))),
                read_modes=np_softmax(n((B, R, 3))) if links else None)


def to_torch(fields, cls, dtype=torch.float64):
    return cls(**{k: None if v is None else torch.tensor(v, dtype=dtype)
                  for k, v in fields.items()})


def rel_err(actual, expected):
    actual = actual.detach().double().numpy()
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    return np.abs(actual - expected).max() / np.abs(expected).max()


def naive_dnc_step(state, iface, links):
    """Naive step over the batch: (reads, dict of new state fields)."""
    results = [naive_step({k: v[b] if v is not None else None for k, v in state.items()},
                          {k: v[b] if v is not None else None for k, v in iface.items()}, links)
               for b in range(B)]
    reads = np.array([r for r, _ in results])
    new = {k: None if results[0][1][k] is None else np.array([s[k] for _, s in results])
           for k in STATE_FIELDS}
    return reads, new


def assert_step_matches(reads, new_state, expected_reads, expected_state, tol):
    assert rel_err(reads, expected_reads) <= tol, "read vectors"
    for field in STATE_FIELDS:
        got, want = getattr(new_state, field), expected_state[field]
        if want is None:
            assert got is None, f"{field} should be None with links off"
        else:
            assert rel_err(got, want) <= tol, field


# ----------------------------------------------------------------------------------------
# 1. The whole step against the naive reference
# ----------------------------------------------------------------------------------------

@LINKS
@pytest.mark.parametrize("seed", SEEDS)
def test_dnc_step_matches_naive(seed, links):
    rng = np.random.default_rng(seed)
    state, iface = random_state(rng, links), random_interface(rng, links)
    reads, new = D.dnc_step(to_torch(state, D.DNCState), to_torch(iface, D.DNCInterface))
    assert_step_matches(reads, new, *naive_dnc_step(state, iface, links), TOL)


# ----------------------------------------------------------------------------------------
# 2. Each mechanism against the naive reference
# ----------------------------------------------------------------------------------------

def t(x):
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("seed", SEEDS)
def test_content_weights(seed):
    rng = np.random.default_rng(seed)
    memory, keys, strengths = random_memory(rng), rng.standard_normal((B, R, W)), \
        oneplus(rng.standard_normal((B, R)))
    expected = per_batch(lambda m, ks, bs: [naive_content(m, k, s) for k, s in zip(ks, bs)],
                         memory, keys, strengths)
    assert rel_err(D.content_weights(t(memory), t(keys), t(strengths)), expected) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_update_usage(seed):
    rng = np.random.default_rng(seed)
    s = random_state(rng, False)
    free = sigmoid(rng.standard_normal((B, R)))
    expected = per_batch(naive_usage, s["usage"], s["write_weights"], s["read_weights"], free)
    got = D.update_usage(t(s["usage"]), t(s["write_weights"]), t(s["read_weights"]), t(free))
    assert rel_err(got, expected) <= TOL


# Usages the uniform draws never produce: the fresh state (all zero), ties (broken by slot
# index, since naive_allocation's sort is stable), exact zeros and ones mixed, all full.
SPECIAL_USAGES = {
    "fresh": [[0.0] * N] * B,
    "ties": [[0.5, 0.2, 0.5, 0.2, 0.9, 0.2, 0.5],
             [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3],
             [0.7, 0.1, 0.4, 0.4, 0.1, 0.7, 0.4]],
    "zeros_and_ones": [[1.0, 0.0, 0.5, 0.0, 1.0, 0.25, 0.0],
                       [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0],
                       [0.0, 1.0, 0.6, 0.6, 1.0, 0.0, 0.3]],
    "full": [[1.0] * N] * B,
}


@pytest.mark.parametrize("seed", SEEDS)
def test_allocation_weights(seed):
    usage = np.random.default_rng(seed).uniform(0.01, 0.99, (B, N))
    assert rel_err(D.allocation_weights(t(usage)), per_batch(naive_allocation, usage)) <= TOL


@pytest.mark.parametrize("case", SPECIAL_USAGES)
def test_allocation_weights_at_zeros_ties_and_ones(case):
    usage = np.array(SPECIAL_USAGES[case])
    got = D.allocation_weights(t(usage))
    torch.testing.assert_close(got, t(per_batch(naive_allocation, usage)), rtol=0, atol=1e-15)
    # the fresh state allocates all of the first slot; a full memory allocates nothing
    if case == "fresh":
        assert torch.equal(got, F.one_hot(torch.zeros(B, dtype=torch.long), N).double())
    if case == "full":
        assert torch.equal(got, torch.zeros(B, N, dtype=torch.float64))


@pytest.mark.parametrize("seed", SEEDS)
def test_write_weighting(seed):
    rng = np.random.default_rng(seed)
    alloc = per_batch(naive_allocation, rng.uniform(0.01, 0.99, (B, N)))
    content = np_softmax(rng.standard_normal((B, N)))
    ga, gw = rng.uniform(0.05, 0.95, (B, 1)), rng.uniform(0.05, 0.95, (B, 1))
    expected = per_batch(lambda a, c, x, y: naive_write_weighting(a, c, x[0], y[0]),
                         alloc, content, ga, gw)
    assert rel_err(D.write_weighting(t(alloc), t(content), t(ga), t(gw)), expected) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_write_memory(seed):
    rng = np.random.default_rng(seed)
    memory, ww = random_memory(rng), random_weighting(rng, B, N)
    erase, vec = sigmoid(rng.standard_normal((B, W))), rng.standard_normal((B, W))
    expected = per_batch(naive_write_memory, memory, ww, erase, vec)
    assert rel_err(D.write_memory(t(memory), t(ww), t(erase), t(vec)), expected) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_update_links(seed):
    rng = np.random.default_rng(seed)
    s = random_state(rng, True)
    ww = random_weighting(rng, B, N)
    want_link, want_prec = per_batch(naive_links, s["link"], s["precedence"], ww)
    got_link, got_prec = D.update_links(t(s["link"]), t(s["precedence"]), t(ww))
    assert rel_err(got_link, want_link) <= TOL
    assert rel_err(got_prec, want_prec) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_directional_weights(seed):
    rng = np.random.default_rng(seed)
    s = random_state(rng, True)
    want_fwd, want_bwd = per_batch(naive_directional, s["link"], s["read_weights"])
    got_fwd, got_bwd = D.directional_weights(t(s["link"]), t(s["read_weights"]))
    assert rel_err(got_fwd, want_fwd) <= TOL
    assert rel_err(got_bwd, want_bwd) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_read_memory(seed):
    rng = np.random.default_rng(seed)
    memory, wr = random_memory(rng), np_softmax(rng.standard_normal((B, R, N)))
    assert rel_err(D.read_memory(t(memory), t(wr)), per_batch(naive_read, memory, wr)) <= TOL


# ----------------------------------------------------------------------------------------
# 3. Invariants
# ----------------------------------------------------------------------------------------

def zero_state(links, dtype=torch.float64):
    z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    return D.DNCState(z(B, N, W), z(B, N), z(B, N), z(B, R, N),
                      z(B, N, N) if links else None, z(B, N) if links else None)


def chain(links, steps=50, seed=0):
    """Yield (reads, state) over `steps` dnc_steps with random interfaces from a fresh state.
    Gates are widely spread (scale 3) so that near-full writes and frees both happen."""
    rng = np.random.default_rng(seed)
    state = zero_state(links)
    for _ in range(steps):
        reads, state = D.dnc_step(state, to_torch(random_interface(rng, links, 3.0),
                                                  D.DNCInterface))
        yield reads, state


@LINKS
def test_invariants_over_many_steps(links):
    eps = 1e-12
    for _, s in chain(links):
        assert (s.write_weights >= 0).all() and (s.write_weights.sum(-1) <= 1 + eps).all()
        assert (s.usage >= 0).all() and (s.usage <= 1 + eps).all()
        read_sums = s.read_weights.sum(-1)
        assert (s.read_weights >= -eps).all()
        if links:
            assert (read_sums <= 1 + eps).all()
            assert (torch.diagonal(s.link, dim1=-2, dim2=-1) == 0).all()
            assert (s.link >= 0).all() and (s.precedence.sum(-1) <= 1 + eps).all()
        else:
            assert torch.allclose(read_sums, torch.ones_like(read_sums), atol=1e-12)


def test_usage_reaches_both_ends_over_chain():
    """Guards the invariant test above against a chain too timid to stress usage."""
    usage = torch.stack([s.usage for _, s in chain(False)])
    assert usage.max() > 0.75 and usage.min() < 0.1


@pytest.mark.parametrize("case", [*SEEDS, "fresh", "ties", "zeros_and_ones"])
def test_allocation_prefers_least_used_slot(case):
    if case in SPECIAL_USAGES:
        usage = t(SPECIAL_USAGES[case])
    else:
        usage = torch.tensor(np.random.default_rng(case).uniform(0.01, 0.99, (B, N)))
    alloc = D.allocation_weights(usage)
    # a[φ_1] = 1 − u[φ_1] > a[φ_j] for j > 1 while u[φ_1] < 1, so the maximum is unique and
    # lies on the least used slot; of tied least used slots, the one of lowest index
    first_least_used = torch.tensor([row.index(min(row)) for row in usage.tolist()])
    assert torch.equal(alloc.argmax(-1), first_least_used)
    assert (alloc.max(-1).values > alloc.topk(2, -1).values[:, 1]).all()


def test_full_erase_one_hot_write_replaces_row():
    rng = np.random.default_rng(0)
    memory, vec = t(random_memory(rng)), t(rng.standard_normal((B, W)))
    slots = [2, 0, 6]
    ww = F.one_hot(torch.tensor(slots), N).double()
    new = D.write_memory(memory, ww, torch.ones(B, W, dtype=torch.float64), vec)
    for b, slot in enumerate(slots):
        assert torch.equal(new[b, slot], vec[b])
        others = [i for i in range(N) if i != slot]
        assert torch.equal(new[b, others], memory[b, others])


@LINKS
def test_step_writes_to_free_slot_when_allocating(links):
    """Through the whole step: a slot with zero usage and zero previous write is the first on
    the free list, so g^a = g^w = 1 with e = 1 puts exactly v there and leaves the rest."""
    rng = np.random.default_rng(1)
    state, iface = random_state(rng, links), random_interface(rng, links)
    free = [4, 1, 5]
    for b, slot in enumerate(free):
        state["usage"][b, slot] = state["write_weights"][b, slot] = 0.0
    iface.update(allocation_gate=np.ones((B, 1)), write_gate=np.ones((B, 1)),
                 erase_vector=np.ones((B, W)))
    _, new = D.dnc_step(to_torch(state, D.DNCState), to_torch(iface, D.DNCInterface))
    for b, slot in enumerate(free):
        assert torch.equal(new.write_weights[b], F.one_hot(torch.tensor(slot), N).double())
        assert torch.equal(new.memory[b, slot], t(iface["write_vector"][b]))
        others = [i for i in range(N) if i != slot]
        assert torch.equal(new.memory[b, others], t(state["memory"][b, others]))


@LINKS
def test_float32_preserved_and_close_to_float64(links):
    rng = np.random.default_rng(5)
    state, iface = random_state(rng, links), random_interface(rng, links)
    reads, new = D.dnc_step(to_torch(state, D.DNCState, torch.float32),
                            to_torch(iface, D.DNCInterface, torch.float32))
    expected_reads, expected_state = naive_dnc_step(state, iface, links)
    assert reads.dtype == torch.float32
    for field in STATE_FIELDS:
        value = getattr(new, field)
        assert value is None or value.dtype == torch.float32, field
    assert_step_matches(reads, new, expected_reads, expected_state, 1e-4)


# ----------------------------------------------------------------------------------------
# 4. DNCMemory module
# ----------------------------------------------------------------------------------------

def tiny_cfg(links, kernel="eager"):
    return D.Config(hidden_size=32, num_layers=2, num_heads=2, mem_slots=8, mem_width=6,
                    num_reads=3, seq_len=16, vocab_size=97, dropout=0.0, temporal_links=links,
                    dnc_kernel=kernel)


def tiny_memory(links, dtype=torch.float32, kernel="eager"):
    torch.manual_seed(0)
    cfg = tiny_cfg(links, kernel)
    return cfg, D.DNCMemory(cfg).to(dtype).eval()


def random_h(cfg, batch=2, length=6, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(batch, length, cfg.hidden_size, generator=gen).to(dtype)


@LINKS
def test_memory_forward_shapes(links):
    cfg, mem = tiny_memory(links)
    with torch.no_grad():
        out = mem(random_h(cfg, batch=2, length=5))
    n, w, r = cfg.mem_slots, cfg.mem_width, cfg.num_reads
    assert isinstance(out, D.MemoryOutput)
    assert out.reads.shape == (2, 5, r, w) and out.write_gate.shape == (2, 5)
    assert out.write_weights.shape == (2, 5, n) and out.state.memory.shape == (2, n, w)


@LINKS
def test_interface_ranges(links):
    cfg, mem = tiny_memory(links)
    with torch.no_grad():
        x = mem.interface(random_h(cfg, batch=4, length=1)[:, 0])
    n_b, w, r = 4, cfg.mem_width, cfg.num_reads
    shapes = dict(write_key=(n_b, w), write_strength=(n_b, 1), erase_vector=(n_b, w),
                  write_vector=(n_b, w), free_gates=(n_b, r), allocation_gate=(n_b, 1),
                  write_gate=(n_b, 1), read_keys=(n_b, r, w), read_strengths=(n_b, r))
    for name, shape in shapes.items():
        assert getattr(x, name).shape == shape, name
    assert (x.write_strength >= 1).all() and (x.read_strengths >= 1).all()
    for name in ["erase_vector", "free_gates", "allocation_gate", "write_gate"]:
        gate = getattr(x, name)
        assert ((gate > 0) & (gate < 1)).all(), name
    if links:
        assert x.read_modes.shape == (n_b, r, 3) and (x.read_modes >= 0).all()
        assert torch.allclose(x.read_modes.sum(-1), torch.ones(n_b, r), atol=1e-6)
    else:
        assert x.read_modes is None


@LINKS
def test_initial_state(links):
    cfg, mem = tiny_memory(links)
    s = mem.initial_state(2, torch.device("cpu"), torch.float64)
    n, w, r = cfg.mem_slots, cfg.mem_width, cfg.num_reads
    shapes = dict(memory=(2, n, w), usage=(2, n), write_weights=(2, n), read_weights=(2, r, n),
                  link=(2, n, n), precedence=(2, n))
    for field, shape in shapes.items():
        value = getattr(s, field)
        if not links and field in ("link", "precedence"):
            assert value is None, field
            continue
        assert value.shape == shape and value.dtype == torch.float64, field
        assert (value == 0).all(), field


def naive_interface(h, weight, bias, cfg, links):
    """The activated interface of one token from the projection's weights, field by field in
    the layout of DNCInterface: h (B, hidden) float64 arrays -> dict of arrays."""
    n_w, n_r = cfg.mem_width, cfg.num_reads
    z = h @ weight.T + bias
    names = ["write_key", "write_strength", "erase_vector", "write_vector", "free_gates",
             "allocation_gate", "write_gate", "read_keys", "read_strengths"]
    sizes = [n_w, 1, n_w, n_w, n_r, 1, 1, n_r * n_w, n_r]
    if links:
        names, sizes = names + ["read_modes"], sizes + [3 * n_r]
    raw, start = {}, 0
    for name, size in zip(names, sizes):
        raw[name], start = z[:, start:start + size], start + size
    assert start == z.shape[1]  # no field left over
    return dict(write_key=raw["write_key"], write_strength=oneplus(raw["write_strength"]),
                erase_vector=sigmoid(raw["erase_vector"]), write_vector=raw["write_vector"],
                free_gates=sigmoid(raw["free_gates"]),
                allocation_gate=sigmoid(raw["allocation_gate"]),
                write_gate=sigmoid(raw["write_gate"]),
                read_keys=raw["read_keys"].reshape(-1, n_r, n_w),
                read_strengths=oneplus(raw["read_strengths"]),
                read_modes=np_softmax(raw["read_modes"].reshape(-1, n_r, 3)) if links else None)


@KERNELS
@LINKS
def test_scan_matches_the_naive_reference_token_by_token(links, kernel):
    """DNCMemory.forward (interface layer, time loop, every dnc_step) against the naive step run
    from the fresh state, over several tokens, with gates spread wide enough (h scaled by 3)
    that writes, frees and allocation all change from token to token."""
    cfg, mem = tiny_memory(links, torch.float64, kernel)
    length = 7
    h = random_h(cfg, batch=B, length=length, dtype=torch.float64)
    with torch.no_grad():
        reads, gate, ww, final = mem(h)
    weight = mem.interface_proj.weight.detach().numpy()
    bias = mem.interface_proj.bias.detach().numpy()
    n, r, w = cfg.mem_slots, cfg.num_reads, cfg.mem_width
    state = dict(memory=np.zeros((B, n, w)), usage=np.zeros((B, n)),
                 write_weights=np.zeros((B, n)), read_weights=np.zeros((B, r, n)),
                 link=np.zeros((B, n, n)) if links else None,
                 precedence=np.zeros((B, n)) if links else None)
    gates = []
    for step in range(length):
        iface = naive_interface(h[:, step].numpy(), weight, bias, cfg, links)
        expected_reads, state = naive_dnc_step(state, iface, links)
        gates.append(iface["write_gate"][:, 0])
        assert rel_err(reads[:, step], expected_reads) <= TOL, step
        assert rel_err(ww[:, step], state["write_weights"]) <= TOL, step
    assert rel_err(gate, np.stack(gates, 1)) <= TOL
    assert_step_matches(reads[:, -1], final, expected_reads, state, TOL)
    # the chain is not trivial: the usage of some slot has risen well above zero
    assert final.usage.max() > 0.3


def context_memory(k, dtype=torch.float64):
    """A tiny memory whose interface reads k tokens, the earlier tokens' weights random (at
    zero, as they start, every term of theirs would vanish from the comparison)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cfg(False), interface_context=k)
    mem = D.DNCMemory(cfg).to(dtype).eval()
    with torch.no_grad():
        mem.context_proj.weight.normal_(0, 0.3)
    return cfg, mem


def test_interface_context_is_the_naive_sum_over_the_earlier_tokens():
    """x_t = W h_t + b + sum_j W_j h_{t-j}, the terms of tokens before the segment absent:
    token by token, from the column blocks of the two weights."""
    k, length = 3, 6
    cfg, mem = context_memory(k)
    h = random_h(cfg, batch=B, length=length, dtype=torch.float64)
    with torch.no_grad():
        got = mem.interface(h)
    weight = np.concatenate([mem.interface_proj.weight.detach().numpy(),
                             mem.context_proj.weight.detach().numpy()], axis=1)
    bias = mem.interface_proj.bias.detach().numpy()
    zeros = np.zeros((B, cfg.hidden_size))
    for t in range(length):
        window = [h[:, t - j].numpy() if t - j >= 0 else zeros for j in range(k)]
        expected = naive_interface(np.concatenate(window, axis=1), weight, bias, cfg, False)
        for name, value in expected.items():
            if value is not None:
                assert rel_err(getattr(got, name)[:, t], value) <= TOL, (name, t)
    # the earlier tokens count: without them the interface differs from token 1 on
    plain = naive_interface(h[:, 1].numpy(), weight[:, :cfg.hidden_size], bias, cfg, False)
    assert rel_err(got.write_key[:, 1], plain["write_key"]) > 1e-3


def test_interface_context_starts_as_the_current_token_alone_and_can_learn():
    """k > 1 with its zero start computes what k = 1 computes, and the earlier tokens'
    weights get a gradient at once (a zero start that stayed zero would be dead)."""
    torch.manual_seed(0)
    one = D.DNCMemory(tiny_cfg(False)).eval()
    cfg = dataclasses.replace(tiny_cfg(False), interface_context=4)
    four = D.DNCMemory(cfg).eval()
    assert four.load_state_dict(one.state_dict(), strict=False).missing_keys == [
        "context_proj.weight"]
    h = random_h(cfg, batch=2, length=7)
    for a, b in zip(one(h)[:3], four(h)[:3]):  # reads, write gates and write weights
        assert torch.equal(a, b)
    four(h).reads.square().sum().backward()
    grad = four.context_proj.weight.grad
    assert grad.shape == (sum(four.sizes), 3 * cfg.hidden_size)
    assert grad.abs().amax(0).view(3, -1).amax(1).min() > 0  # every earlier token's block


# ----------------------------------------------------------------------------------------
# 5. Causality of the memory alone
# ----------------------------------------------------------------------------------------

@KERNELS
@LINKS
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("context", [1, 3])  # interface_context: the interface's tokens
def test_memory_is_causal(links, k, kernel, context):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cfg(links, kernel), interface_context=context)
    mem = D.DNCMemory(cfg).eval()
    if context > 1:
        torch.nn.init.normal_(mem.context_proj.weight, std=0.3)
    h = random_h(cfg, batch=2, length=6)
    changed = h.clone()
    changed[:, k] += torch.randn(2, cfg.hidden_size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before, after = mem(h), mem(changed)
    for a, b in zip(before[:3], after[:3]):  # reads, write gates and write weights
        assert (a[:, :k] - b[:, :k]).abs().max() <= 1e-6
        assert (a[:, k:] - b[:, k:]).abs().max() > 1e-6  # the change does reach position k


# ----------------------------------------------------------------------------------------
# 6. Gradients of the whole step: float64 gradcheck
# ----------------------------------------------------------------------------------------

def gradcheck_step(state, ifaces, state_fields=()):
    """gradcheck of dnc_step chained over the interfaces `ifaces` from `state`, with respect to
    every interface field and the named state fields (the rest of the state held fixed), of
    the reads of every step and the final state."""
    i_fields = [k for k in D.DNCInterface._fields if getattr(ifaces[0], k) is not None]
    inputs = [getattr(state, k).clone().requires_grad_() for k in state_fields]
    inputs += [getattr(i, k).clone().requires_grad_() for i in ifaces for k in i_fields]

    def chained(*xs):
        s = state._replace(**dict(zip(state_fields, xs)))
        xs, reads = xs[len(state_fields):], []
        for _ in ifaces:
            read, s = D.dnc_step(s, D.DNCInterface(**{
                **dict.fromkeys(D.DNCInterface._fields), **dict(zip(i_fields, xs))}))
            xs, reads = xs[len(i_fields):], reads + [read]
        return (*reads, *(x for x in s if x is not None))

    return torch.autograd.gradcheck(chained, inputs, raise_exception=False)


@LINKS
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_at_random_states(links, seed):
    rng = np.random.default_rng(seed)
    state = to_torch(random_state(rng, links), D.DNCState)
    iface = to_torch(random_interface(rng, links), D.DNCInterface)
    fields = [k for k in STATE_FIELDS if getattr(state, k) is not None]
    assert gradcheck_step(state, [iface], fields)


@LINKS
def test_gradcheck_from_the_fresh_state(links):
    """Training starts every sequence from the all-zero state, which is held fixed; what must
    be differentiable there is the chain of steps in the interfaces. After the first write
    every slot but the first holds the same usage (content weights over an all-zero memory
    are uniform), so the second step sorts exactly tied usages; they stay tied under any
    change of the interfaces, so the chain is smooth and gradcheck applies."""
    rng = np.random.default_rng(0)
    ifaces = [to_torch(random_interface(rng, links), D.DNCInterface) for _ in range(2)]
    _, first = D.dnc_step(zero_state(links), ifaces[0])
    usage = D.update_usage(first.usage, first.write_weights, first.read_weights,
                           ifaces[1].free_gates)
    assert (usage[:, 1:] == usage[:, 1:2]).all() and (usage[:, 0] != usage[:, 1]).all()
    assert gradcheck_step(zero_state(links), ifaces)


@LINKS
def test_tied_usages_as_an_input_give_the_ordered_one_sided_gradient(links):
    """With the usage itself as the input, exact ties are a point where the sort, and so the
    allocation, is discontinuous: moving one tied usage up by any ε > 0 sends its slot from
    the head of the free list to behind the others (the fresh state: a jumps from [1, 0, ...]
    to [0, 1, 0, ...]), so no derivative exists there and gradcheck's finite differences
    must disagree with any backward. What the backward returns at the tie is the derivative
    with the ties broken by slot index, the order of the forward (stable sort): the limit of
    the gradient at usages that rise with the index as their gaps shrink to zero. Those
    nearby points are well defined and pass gradcheck."""
    rng = np.random.default_rng(2)
    iface = to_torch(random_interface(rng, links), D.DNCInterface)
    tied = zero_state(links)
    reads, new = D.dnc_step(tied, iface)
    naive_reads, naive_state = naive_dnc_step(
        {k: None if v is None else v.numpy() for k, v in tied._asdict().items()},
        {k: None if v is None else v.numpy() for k, v in iface._asdict().items()}, links)
    torch.testing.assert_close(reads, t(naive_reads), rtol=0, atol=1e-12)
    for field in STATE_FIELDS:
        if naive_state[field] is not None:
            torch.testing.assert_close(getattr(new, field), t(naive_state[field]),
                                       rtol=0, atol=1e-12)
    assert torch.equal(new.write_weights.argmax(-1), torch.zeros(B, dtype=torch.long))
    assert not gradcheck_step(tied, [iface], ["usage"])

    def usage_jacobian(usage):
        return torch.autograd.functional.jacobian(
            lambda u: D.dnc_step(tied._replace(usage=u), iface)[1].write_weights, usage)

    def ordered(gap):
        return tied._replace(usage=gap * torch.arange(N, dtype=torch.float64).repeat(B, 1))

    assert gradcheck_step(ordered(1e-3), [iface], ["usage"])
    at_tie = usage_jacobian(tied.usage)
    assert at_tie.abs().max() > 0.1
    for gap in (1e-4, 1e-6):
        torch.testing.assert_close(usage_jacobian(ordered(gap).usage), at_tie,
                                   rtol=0, atol=gap)


# ----------------------------------------------------------------------------------------
# 7. The fused scan (dnc_kernel=fused): one C++ operation with a hand-written backward
# ----------------------------------------------------------------------------------------

def random_scan_interface(rng, links, batch, length, width=W, reads=R, gate_scale=3.0):
    """Activated interface fields over `length` tokens (batch, length, ...), gates spread
    wide (scale 3) so that writes, frees and allocation change from token to token."""
    n = rng.standard_normal
    bt = (batch, length)
    return dict(write_key=n(bt + (width,)), write_strength=oneplus(n(bt + (1,))),
                erase_vector=sigmoid(n(bt + (width,))), write_vector=n(bt + (width,)),
                free_gates=sigmoid(gate_scale * n(bt + (reads,))),
                allocation_gate=sigmoid(gate_scale * n(bt + (1,))),
                write_gate=sigmoid(gate_scale * n(bt + (1,))),
                read_keys=n(bt + (reads, width)), read_strengths=oneplus(n(bt + (reads,))),
                read_modes=np_softmax(n(bt + (reads, 3))) if links else None)


def looped_scan(state, iface):
    """The reference: dnc_step token by token (the loop written here, not DNCMemory's)."""
    reads, write_weights = [], []
    for k in range(iface.write_key.shape[1]):
        read, state = D.dnc_step(state, D.DNCInterface(
            *(None if x is None else x[:, k] for x in iface)))
        reads.append(read)
        write_weights.append(state.write_weights)
    return torch.stack(reads, 1), torch.stack(write_weights, 1), state


def scan_outputs(scan, state, iface):
    reads, write_weights, final = scan(state, iface)
    return (reads, write_weights, *(x for x in final if x is not None))


def leaves(named_tuple):
    return named_tuple._replace(**{k: v.clone().requires_grad_() for k, v in
                                   named_tuple._asdict().items() if v is not None})


def present(named_tuple):
    return [v for v in named_tuple if v is not None]


@LINKS
@pytest.mark.parametrize("start", ["fresh", "random"])
def test_fused_scan_gradcheck(links, start):
    """float64 gradcheck of the whole fused scan over 4 tokens: the gradients of every
    interface field of every token, and (from a random state) of every state field, for the
    reads, the write weights and the final state. The fresh state is held fixed: its usages
    are exactly tied (see test_gradcheck_from_the_fresh_state)."""
    rng = np.random.default_rng(11)
    iface = leaves(to_torch(random_scan_interface(rng, links, B, 4), D.DNCInterface))
    state = zero_state(links)
    if start == "random":
        state = leaves(to_torch(random_state(rng, links), D.DNCState))
    inputs = present(iface) + (present(state) if start == "random" else [])
    n_iface = len(present(iface))

    def fused(*xs):
        fields = iter(xs)
        i = iface._replace(**{k: next(fields) for k, v in iface._asdict().items() if v is not None})
        s = state
        if start == "random":
            s = state._replace(**{k: next(fields) for k, v in state._asdict().items()
                                  if v is not None})
        return scan_outputs(D.fused_scan, s, i)

    assert len(inputs) > n_iface or start == "fresh"
    assert torch.autograd.gradcheck(fused, inputs, raise_exception=False)


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@LINKS
def test_fused_scan_equals_the_eager_loop_in_float32_at_the_default_sizes(links):
    """At Config's default sizes (N 64, W 128, R 4, 4 x 128 tokens) from a random state: the
    reads, write weights, final state and the gradient of every input (every interface field
    and every state field) agree with the loop of dnc_step within 1e-5 relative."""
    cfg = D.Config()
    batch, length, n, w, r = cfg.batch_size, cfg.seq_len, cfg.mem_slots, cfg.mem_width, cfg.num_reads
    rng = np.random.default_rng(3)
    iface = to_torch(random_scan_interface(rng, links, batch, length, w, r), D.DNCInterface,
                     torch.float32)
    mem = D.DNCMemory(dataclasses.replace(cfg, temporal_links=links))
    start = mem.initial_state(batch)
    state = D.DNCState(*(None if x is None else torch.rand(x.shape, generator=torch.Generator()
                                                          .manual_seed(k)) / x.shape[-1]
                         for k, x in enumerate(start)))
    results = []
    for scan in (looped_scan, D.fused_scan):
        i, s = leaves(iface), leaves(state)
        outputs = scan_outputs(scan, s, i)
        gen = torch.Generator().manual_seed(0)
        loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
        grads = torch.autograd.grad(loss, present(i) + present(s))
        results.append([o.detach() for o in outputs] + list(grads))
    assert len(results[0]) == 2 + len(present(state)) * 2 + len(present(iface))
    for k, (eager, fused) in enumerate(zip(*results)):
        assert eager.abs().max() > 0, k
        assert relative_error(fused, eager) <= 1e-5, k


@LINKS
def test_fused_scan_continues_a_carried_state_and_backpropagates_into_it(links):
    """carry_memory and bptt_segments: two scans, the second from the first's final state,
    equal one scan over both, and the gradient reaches the first segment's interface through
    the state exactly as through one scan."""
    rng = np.random.default_rng(4)
    iface = to_torch(random_scan_interface(rng, links, B, 6), D.DNCInterface)

    def split(named, part):
        return named._replace(**{k: v[:, part] for k, v in named._asdict().items()
                                 if v is not None})

    grads = []
    for halves in (False, True):
        i = leaves(iface)
        if halves:
            r1, w1, mid = D.fused_scan(zero_state(links), split(i, slice(0, 3)))
            r2, w2, final = D.fused_scan(mid, split(i, slice(3, 6)))
            reads, ww = torch.cat([r1, r2], 1), torch.cat([w1, w2], 1)
        else:
            reads, ww, final = D.fused_scan(zero_state(links), i)
        loss = (reads[:, -1] ** 2).sum() + final.memory.sum()  # the last token only
        grads.append(torch.autograd.grad(loss, present(i)))
        outputs = (reads, ww, *present(final))
        if halves:
            for a, b in zip(outputs, whole):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        whole = outputs
    assert grads[0][3][:, 0].abs().max() > 1e-6  # the first token's write vector matters
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_dnc_kernel_routes(monkeypatch, capsys):
    """auto: Triton on CUDA tensors, fused on the CPU when it builds, else eager with one line
    saying why; fused and triton: an error when they cannot run; eager: never a fused scan."""
    assert D.scan_route("auto", "cpu") == "fused"
    assert D.scan_route("fused", "cpu") == "fused"
    assert D.scan_route("auto", "cuda") == "triton" and D.scan_route("eager", "cpu") == "eager"
    assert D.scan_route("auto", "mps") == "eager"
    with pytest.raises(D.ConfigError, match="--dnc_kernel=triton: that scan runs on cuda"):
        D.validate_config(D.Config(dnc_kernel="triton", device="cpu"))
    monkeypatch.setattr(D, "_FUSED_SCAN", dict(D._FUSED_SCAN))  # its "said once" stays here
    monkeypatch.setattr(D, "triton", None)  # a machine without Triton
    with pytest.raises(D.ConfigError, match="pip install triton"):
        D.scan_route("triton", "cuda")
    assert D.scan_route("auto", "cuda") == "eager"
    assert capsys.readouterr().err.count("pip install triton") == 1
    monkeypatch.undo()
    monkeypatch.setattr(D, "_FUSED_SCAN", {"module": "CalledProcessError: no g++"})
    assert D.scan_route("auto", "cpu") == "eager" and D.scan_route("auto", "cpu") == "eager"
    assert capsys.readouterr().err.count("no g++") == 1  # said once
    with pytest.raises(D.ConfigError, match="no g++.*--dnc_kernel=eager"):
        D.scan_route("fused", "cpu")
    with pytest.raises(D.ConfigError, match="--dnc_kernel=fused"):
        D.validate_config(D.Config(dnc_kernel="fused"))
    with pytest.raises(D.ConfigError, match="use auto, fused, triton or eager"):
        D.validate_config(D.Config(dnc_kernel="fast"))

    calls = []
    monkeypatch.setattr(D, "fused_scan", lambda *a: calls.append(a))
    cfg, mem = tiny_memory(False, kernel="eager")
    mem(random_h(cfg))
    assert calls == []

"""DNC memory tests: every mechanism and the whole step against a naive float64 reference,
the invariants of the paper (Graves et al. 2016), and the DNCMemory module's time loop.

The reference below is written from the equations in the API contract with plain Python
loops over one batch element, so it shares no vectorisation (and no bugs of one) with
dnc_gpt2.py.
"""
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


@pytest.mark.parametrize("seed", SEEDS)
def test_allocation_weights(seed):
    usage = np.random.default_rng(seed).uniform(0.01, 0.99, (B, N))
    assert rel_err(D.allocation_weights(t(usage)), per_batch(naive_allocation, usage)) <= TOL


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


@pytest.mark.parametrize("seed", SEEDS)
def test_allocation_prefers_least_used_slot(seed):
    usage = torch.tensor(np.random.default_rng(seed).uniform(0.01, 0.99, (B, N)))
    alloc = D.allocation_weights(usage)
    assert torch.equal(alloc.argmax(-1), usage.argmin(-1))


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

def tiny_cfg(links):
    return D.Config(hidden_size=32, num_layers=2, num_heads=2, mem_slots=8, mem_width=6,
                    num_reads=3, seq_len=16, vocab_size=97, dropout=0.0, temporal_links=links)


def tiny_memory(links, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = tiny_cfg(links)
    return cfg, D.DNCMemory(cfg).to(dtype).eval()


def random_h(cfg, batch=2, length=6, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(batch, length, cfg.hidden_size, generator=gen).to(dtype)


@LINKS
def test_memory_forward_shapes(links):
    cfg, mem = tiny_memory(links)
    with torch.no_grad():
        reads, gate, ww = mem(random_h(cfg, batch=2, length=5))
    n, w, r = cfg.mem_slots, cfg.mem_width, cfg.num_reads
    assert reads.shape == (2, 5, r, w) and gate.shape == (2, 5) and ww.shape == (2, 5, n)


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


@LINKS
def test_forward_equals_manual_loop(links):
    cfg, mem = tiny_memory(links, torch.float64)
    h = random_h(cfg, batch=2, length=6, dtype=torch.float64)
    with torch.no_grad():
        reads, gate, ww = mem(h)
        state = mem.initial_state(2, h.device, h.dtype)
        for step in range(h.shape[1]):
            iface = mem.interface(h[:, step])
            r, state = D.dnc_step(state, iface)
            assert rel_err(reads[:, step], r.numpy()) <= 1e-10
            assert rel_err(gate[:, step], iface.write_gate[:, 0].numpy()) <= 1e-10
            assert rel_err(ww[:, step], state.write_weights.numpy()) <= 1e-10


# ----------------------------------------------------------------------------------------
# 5. Causality of the memory alone
# ----------------------------------------------------------------------------------------

@LINKS
@pytest.mark.parametrize("k", [1, 3, 5])
def test_memory_is_causal(links, k):
    cfg, mem = tiny_memory(links)
    h = random_h(cfg, batch=2, length=6)
    changed = h.clone()
    changed[:, k] += torch.randn(2, cfg.hidden_size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before, after = mem(h), mem(changed)
    for a, b in zip(before, after):
        assert (a[:, :k] - b[:, :k]).abs().max() <= 1e-6
        assert (a[:, k:] - b[:, k:]).abs().max() > 1e-6  # the change does reach position k

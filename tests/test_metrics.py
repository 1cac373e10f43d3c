"""evaluate() and the losses against values computed by hand with math.log / math.exp."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnc_gpt2 as D

DNC_KEYS = {"avg_gate", "gate_std", "write_rate", "write_sparsity", "mem_kl"}
# Entropy-based values may carry an epsilon inside the log; everything else is tighter.
TOL = dict(rel=1e-5, abs=1e-6)
ENT_TOL = dict(abs=1e-4)


# ---------------------------------------------------------------- pure-Python references

def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def log_softmax(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


def kl(p_logits, q_logits):
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def norm_entropy(w):
    s = sum(w)
    return -sum(x / s * math.log(x / s) for x in w if x > 0) / math.log(len(w))


def bce(g, y):
    return -(y * math.log(g) + (1 - y) * math.log(1 - g))


def reference(rows, targets, gates=None, weights=None, nomem=None):
    """Every evaluate() metric over a flat list of tokens, pooled token by token."""
    lps = [log_softmax(r) for r in rows]
    ranks = [1 + sum(x > r[t] for x in r) for r, t in zip(rows, targets)]
    loss = mean(-lp[t] for lp, t in zip(lps, targets))
    m = dict(loss=loss, ppl=math.exp(loss), bpt=loss / math.log(2),
             top1_acc=mean(r == 1 for r in ranks), top5_acc=mean(r <= 5 for r in ranks),
             confidence=mean(math.exp(lp[t]) for lp, t in zip(lps, targets)),
             mean_rank=mean(ranks),
             pred_entropy=mean(-sum(math.exp(a) * a for a in lp) for lp in lps),
             tokens=len(rows))
    if gates is not None:
        avg = mean(gates)
        m.update(avg_gate=avg, gate_std=math.sqrt(mean((g - avg) ** 2 for g in gates)),
                 write_rate=mean(g > 0.7 for g in gates),
                 write_sparsity=1 - mean(norm_entropy(w) for w in weights),
                 mem_kl=mean(kl(p, q) for p, q in zip(rows, nomem)))
    return m


def flat(t):
    """(B, T, ...) tensor -> list over tokens in row-major order."""
    return t.reshape(-1, *t.shape[2:]).tolist()


# ---------------------------------------------------------------- a model with fixed outputs

class FixedOutputs(nn.Module):
    """Returns pre-built LMOutputs in order and records how it was called."""

    def __init__(self, outputs):
        super().__init__()
        # evaluate() may look up the model's device from its parameters.
        self.anchor = nn.Parameter(torch.zeros(()))
        self.outputs = list(outputs)
        self.calls = []

    def forward(self, input_ids):
        self.calls.append((input_ids.clone(), self.training, torch.is_grad_enabled()))
        return self.outputs[len(self.calls) - 1]


def batch_for(targets):
    """(B, T+1) batch whose b[:, 1:] are the targets; the first column is arbitrary."""
    return torch.cat([torch.full((targets.shape[0], 1), 3), targets], dim=1)


def dnc_output(logits, gate, weights, nomem):
    return D.LMOutput(logits=logits, write_gate=gate, write_weights=weights, nomem_logits=nomem)


def base_output(logits):
    return D.LMOutput(logits=logits, write_gate=None, write_weights=None, nomem_logits=None)


def check(metrics, expected):
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        tol = ENT_TOL if key == "write_sparsity" else TOL
        assert metrics[key] == pytest.approx(value, **tol), key
    assert isinstance(metrics["tokens"], int)


# ---------------------------------------------------------------- evaluate()

# Target 0 is the argmax (rank 1); target 2 ties with index 3 below the max (rank 2: only
# strictly greater logits count); target 5 is the smallest logit (rank 6, outside the top 5);
# target 4 is fifth (rank 5, just inside the top 5).
HAND_LOGITS = torch.tensor([[[2.0, 1.0, 0.0, -1.0, 0.5, 0.4],
                             [0.0, 3.0, 1.0, 1.0, -2.0, 0.2],
                             [1.0, 2.0, 3.0, 4.0, 5.0, 0.0],
                             [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]])
HAND_TARGETS = torch.tensor([[0, 2, 5, 4]])
HAND_NOMEM = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                            [1.0, 0.0, -1.0, 2.0, 0.0, 0.0],
                            [1.0, 2.0, 3.0, 4.0, 5.0, 0.0],
                            [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]]])
# Gate 0.7 exactly is not a write (g > 0.7).
HAND_GATE = torch.tensor([[0.9, 0.2, 0.7, 0.6]])
# One-hot, uniform, 3:1 over two slots, and 4:2:1:1.
HAND_WEIGHTS = torch.tensor([[[0.5, 0.0, 0.0, 0.0],
                              [0.1, 0.1, 0.1, 0.1],
                              [0.3, 0.1, 0.0, 0.0],
                              [0.2, 0.1, 0.05, 0.05]]])


def test_evaluate_baseline_by_hand():
    model = FixedOutputs([base_output(HAND_LOGITS)])
    batch = batch_for(HAND_TARGETS)
    m = D.evaluate(model, [batch])
    (inputs, training, grad_on), = model.calls
    assert torch.equal(inputs, batch[:, :-1]) and not training and not grad_on
    assert m["top1_acc"] == pytest.approx(1 / 4)
    assert m["top5_acc"] == pytest.approx(3 / 4)
    assert m["mean_rank"] == pytest.approx((1 + 2 + 6 + 5) / 4)
    assert m["tokens"] == 4
    check(m, reference(flat(HAND_LOGITS), flat(HAND_TARGETS)))
    assert not DNC_KEYS & set(m)


def test_evaluate_dnc_by_hand():
    out = dnc_output(HAND_LOGITS, HAND_GATE, HAND_WEIGHTS, HAND_NOMEM)
    m = D.evaluate(FixedOutputs([out]), [batch_for(HAND_TARGETS)])
    assert m["avg_gate"] == pytest.approx(0.6)
    assert m["gate_std"] == pytest.approx(math.sqrt((0.3**2 + 0.4**2 + 0.1**2 + 0) / 4))  # population
    assert m["write_rate"] == pytest.approx(1 / 4)
    h_31 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    h_4211 = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 0.25 * math.log(0.125)) / math.log(4)
    assert m["write_sparsity"] == pytest.approx(1 - (0 + 1 + h_31 + h_4211) / 4, **ENT_TOL)
    check(m, reference(flat(HAND_LOGITS), flat(HAND_TARGETS), flat(HAND_GATE),
                       flat(HAND_WEIGHTS), flat(HAND_NOMEM)))


def test_evaluate_pools_tokens_across_batches_of_different_size():
    gen = torch.Generator().manual_seed(0)
    V, T, N = 6, 3, 4
    batches, outputs, pooled, per_batch_ppl = [], [], [[], [], [], [], []], []
    # A small batch predicted badly and a larger one predicted well, so pooling matters.
    for B, good in ((1, False), (3, True)):
        logits = 3 * torch.randn(B, T, V, generator=gen)
        targets = logits.argmax(-1) if good else logits.argmin(-1)
        gate = torch.rand(B, T, generator=gen)
        weights = torch.rand(B, T, N, generator=gen) * gate[..., None] / N
        nomem = torch.randn(B, T, V, generator=gen)
        batches.append(batch_for(targets))
        outputs.append(dnc_output(logits, gate, weights, nomem))
        parts = [flat(logits), flat(targets), flat(gate), flat(weights), flat(nomem)]
        for acc, part in zip(pooled, parts):
            acc.extend(part)
        per_batch_ppl.append(reference(*parts)["ppl"])
    expected = reference(*pooled)
    # The reference code's mean of per-batch exp(loss) must be far from the pooled ppl.
    assert abs(mean(per_batch_ppl) - expected["ppl"]) > 0.5 * expected["ppl"]
    m = D.evaluate(FixedOutputs(outputs), batches)
    assert m["ppl"] == pytest.approx(expected["ppl"], **TOL)
    assert m["tokens"] == 12
    check(m, expected)


# ---------------------------------------------------------------- losses

def test_token_kl_by_hand():
    p = [[3.0, 0.0, 0.0, 0.0], [0.5, -1.0, 2.0, 0.0]]
    q = [[0.0, 0.0, 0.0, 0.0], [0.5, -1.0, 2.0, 0.0]]
    # KL is asymmetric here, so the test tells KL(p_mem || p_nomem) from the reverse.
    assert abs(kl(p[0], q[0]) - kl(q[0], p[0])) > 0.1
    got = D.token_kl(F.log_softmax(torch.tensor([p]), -1), torch.tensor([q]))
    assert got.shape == (1, 2)
    assert got[0, 0].item() == pytest.approx(kl(p[0], q[0]), **TOL)
    assert got[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_routing_target_and_loss_by_hand():
    kls, gates = [0.0, 0.5, 2.0], [0.1, 0.5, 0.95]
    targets = [1 - math.exp(-k) for k in kls]
    kl_t = torch.tensor([kls])
    assert D.routing_target(kl_t)[0].tolist() == pytest.approx(targets, **TOL)
    expected = mean(bce(g, y) for g, y in zip(gates, targets))
    assert D.routing_loss(torch.tensor([gates]), kl_t).item() == pytest.approx(expected, **TOL)


def test_routing_loss_bounded_below_and_minimised_at_target():
    gen = torch.Generator().manual_seed(0)
    kl_t = 3 * torch.rand(4, 8, generator=gen)
    gate = torch.rand(4, 8, generator=gen).clamp(0.01, 0.99)
    target = 1 - torch.exp(-kl_t)
    # BCE(g, k) >= BCE(k, k) = H(k) >= 0, unlike the reference's unbounded -mean(g * KL).
    floor = D.routing_loss(target, kl_t).item()
    assert floor == pytest.approx(mean(bce(y, y) for y in target.flatten().tolist()), **TOL)
    assert 0 <= floor <= D.routing_loss(gate, kl_t).item()
    scan = torch.linspace(0.01, 0.99, 99)
    for k in (0.1, 0.5, 2.0):
        losses = torch.tensor([D.routing_loss(g.view(1, 1), torch.tensor([[k]])).item()
                               for g in scan])
        assert abs(scan[losses.argmin()].item() - (1 - math.exp(-k))) <= 0.01, k


def test_routing_loss_does_not_backprop_into_kl():
    gate = torch.full((2, 3), 0.3, requires_grad=True)
    kl_t = torch.rand(2, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    g_grad, kl_grad = torch.autograd.grad(D.routing_loss(gate, kl_t), [gate, kl_t],
                                          allow_unused=True)
    assert g_grad is not None and g_grad.count_nonzero() > 0
    assert kl_grad is None or kl_grad.count_nonzero() == 0


def test_write_entropy_normalised_and_scale_free():
    w = torch.tensor([[[0.5, 0.0, 0.0, 0.0],
                       [0.1, 0.1, 0.1, 0.1],
                       [0.3, 0.1, 0.0, 0.0],
                       [0.2, 0.1, 0.05, 0.05]]])
    expected = [norm_entropy(row) for row in w[0].tolist()]
    assert expected[0] == 0 and expected[1] == pytest.approx(1)
    got = D.write_entropy(w)
    assert got.shape == (1, 4)
    assert got[0].tolist() == pytest.approx(expected, **ENT_TOL)
    assert all(0.1 < x < 0.9 for x in got[0, 2:].tolist())
    # w is renormalised over slots, so a weaker write of the same shape scores the same.
    torch.testing.assert_close(D.write_entropy(0.1 * w), got, rtol=0, atol=1e-4)
    assert D.entropy_loss(w).item() == pytest.approx(mean(expected), **ENT_TOL)


def test_compute_loss_composition():
    cfg = D.Config(lambda_routing=0.3, lambda_entropy=0.7)
    gen = torch.Generator().manual_seed(0)
    B, T, V, N = 2, 5, 11, 4
    logits = torch.randn(B, T, V, generator=gen, requires_grad=True)
    nomem = torch.randn(B, T, V, generator=gen)
    gate = torch.rand(B, T, generator=gen)
    weights = torch.rand(B, T, N, generator=gen) * gate[..., None] / N
    weights[0, 0, 1:] = 0.0  # a one-hot write: entropy 0, and 0 log 0 must count as 0
    targets = torch.randint(0, V, (B, T), generator=gen)

    # the references, by hand with plain torch ops and none of the module's functions
    x = logits.detach().double()
    log_p = x - x.exp().sum(-1, keepdim=True).log()
    lm = -log_p.gather(-1, targets.unsqueeze(-1)).mean().item()
    y = nomem.double()
    log_q = y - y.exp().sum(-1, keepdim=True).log()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    kappa = 1 - torch.exp(-kl)
    g = gate.double()
    routing = -(kappa * g.log() + (1 - kappa) * (1 - g).log()).mean().item()
    p = weights.double() / weights.double().sum(-1, keepdim=True)
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    entropy = (-plogp.sum(-1) / math.log(N)).mean().item()
    assert (kl > 0.1).all() and 0 < entropy < 1

    total, parts = D.compute_loss(dnc_output(logits, gate, weights, nomem), targets, cfg, True)
    assert set(parts) == {"lm", "routing", "entropy"}
    assert all(isinstance(v, float) for v in parts.values())
    assert parts["lm"] == pytest.approx(lm, **TOL)
    assert parts["routing"] == pytest.approx(routing, **TOL)
    assert parts["entropy"] == pytest.approx(entropy, **TOL)
    assert total.dim() == 0 and total.requires_grad
    assert total.item() == pytest.approx(lm + 0.3 * routing + 0.7 * entropy, **TOL)

    total, parts = D.compute_loss(base_output(logits), targets, cfg, False)
    assert set(parts) == {"lm"}
    assert total.item() == pytest.approx(lm, **TOL)

    # λ_r = 0: no routing loss, and no read-free logits needed for it (training skips them)
    unrouted = D.Config(lambda_routing=0.0, lambda_entropy=0.7)
    total, parts = D.compute_loss(dnc_output(logits, gate, weights, None), targets, unrouted, True)
    assert set(parts) == {"lm", "entropy"}
    assert total.item() == pytest.approx(lm + 0.7 * entropy, **TOL)


def test_the_readout_loss_is_the_answers_cross_entropy_from_the_reads_alone():
    gen = torch.Generator().manual_seed(3)
    B, T, V, N, K = 2, 5, 11, 4, 3
    logits = torch.randn(B, T, V, generator=gen)
    gate, weights = torch.rand(B, T, generator=gen), torch.rand(B, T, N, generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    readout = torch.randn(K, V, generator=gen, requires_grad=True)
    answers = torch.randint(0, V, (K,), generator=gen)
    x = readout.detach().double()  # by hand: -log softmax at the answer, averaged
    by_hand = (x.exp().sum(-1).log() - x.gather(-1, answers.unsqueeze(-1)).squeeze(-1)).mean()
    cfg = D.Config(lambda_routing=0.0, lambda_entropy=0.7, answer_readout=0.4)
    out = D.LMOutput(logits, gate, weights, None, None, readout)
    total, parts = D.compute_loss(out, targets, cfg, True, answers)
    assert set(parts) == {"lm", "entropy", "readout"}
    assert parts["readout"] == pytest.approx(by_hand.item(), **TOL)
    assert total.item() == pytest.approx(
        parts["lm"] + 0.7 * parts["entropy"] + 0.4 * by_hand.item(), **TOL)
    # a segment without answers adds nothing (and no NaN from an empty mean)
    empty, parts = D.compute_loss(out._replace(readout_logits=readout[:0]), targets, cfg, True,
                                  answers[:0])
    assert "readout" not in parts
    assert empty.item() == pytest.approx(parts["lm"] + 0.7 * parts["entropy"], **TOL)
    # no readout logits (answer_readout = 0): the loss is the one without it
    plain, _ = D.compute_loss(dnc_output(logits, gate, weights, None), targets, cfg, True, answers)
    assert plain.item() == pytest.approx(empty.item(), **TOL)


def test_the_routing_loss_leaves_the_gradient_of_the_logits_unchanged():
    gen = torch.Generator().manual_seed(1)
    B, T, V, N = 2, 5, 11, 4
    logits = torch.randn(B, T, V, generator=gen, requires_grad=True)
    nomem = torch.randn(B, T, V, generator=gen)
    gate = torch.rand(B, T, generator=gen)
    weights = torch.rand(B, T, N, generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    grads = []
    for lam in (0.0, 0.5):
        cfg = D.Config(lambda_routing=lam, lambda_entropy=0.7)
        total, _ = D.compute_loss(dnc_output(logits, gate, weights, nomem), targets, cfg, True)
        grads.append(torch.autograd.grad(total, logits)[0])
    # the KL inside the routing target is a function of the logits, but a fixed target
    assert torch.equal(grads[0], grads[1])

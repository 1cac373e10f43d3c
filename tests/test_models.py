"""Model tests: causality (memory included), gradient flow, paired init, shapes, size."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import dnc_gpt2 as D

LINKS = pytest.mark.parametrize("links", [False, True], ids=["links_off", "links_on"])


def tiny_cfg(links, **kw):
    return D.Config(**{**dict(hidden_size=32, num_layers=2, num_heads=2, mem_slots=8,
                              mem_width=6, num_reads=3, seq_len=16, vocab_size=97, dropout=0.0,
                              temporal_links=links), **kw})


def tiny_model(use_dnc, links):
    cfg = tiny_cfg(links)
    return cfg, D.build_model(cfg, use_dnc).eval()


def random_ids(cfg, batch=2, length=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length or cfg.seq_len), generator=gen)


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@LINKS
@pytest.mark.parametrize("use_dnc", [False, True], ids=["baseline", "dnc"])
def test_causal_and_per_sequence(use_dnc, links):
    cfg, model = tiny_model(use_dnc, links)
    ids = random_ids(cfg)
    fields = ["logits"] + (["nomem_logits", "write_gate", "write_weights"] if use_dnc else [])
    with torch.no_grad():
        ref = model(ids)
        for k in (1, 7, cfg.seq_len - 1):
            edited = ids.clone()
            edited[0, k] = (ids[0, k] + 1) % cfg.vocab_size
            out = model(edited)
            for name in fields:
                diff = (getattr(ref, name) - getattr(out, name)).abs()
                # Positions before the edit must not see it, through attention or memory.
                assert diff[0, :k].max() <= 1e-5, (name, k)
                # ... while positions from the edit on must (else the check above is vacuous).
                assert diff[0, k:].max() > 1e-5, (name, k)
                # The other sequence in the batch has its own memory state.
                assert diff[1].max() <= 1e-5, (name, k)


def test_the_block_loop_computes_what_hugging_faces_gpt2_model_computes():
    """GPT2LM runs GPT-2's blocks itself, so that the reads can enter between them: the
    baseline's logits are the LM head on GPT2Model's own output, bit for bit, in evaluation,
    and in training too when the dropout masks are drawn from the same seed."""
    cfg = tiny_cfg(False, dropout=0.1)
    model = D.build_model(cfg, False)
    ids = random_ids(cfg)
    with torch.no_grad():
        for training in (False, True):
            model.train(training)
            torch.manual_seed(0)
            ours = model(ids).logits
            torch.manual_seed(0)
            theirs = model.lm_head(model.transformer(input_ids=ids).last_hidden_state)
            assert torch.equal(ours, theirs), training
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout was live


@LINKS
def test_gradients_reach_every_parameter(links, record_interfaces):
    cfg, model = tiny_model(True, links)
    # One projection may produce the whole interface, so a dead part of it (say, unused free
    # gates) would not show as a zero parameter gradient: record each activated field too.
    ifaces = record_interfaces(model)
    ids = random_ids(cfg, length=cfg.seq_len + 1)
    total, _ = D.compute_loss(model(ids[:, :-1]), ids[:, 1:], cfg, True)
    total.backward()
    dead = [name for name, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or p.grad.count_nonzero() == 0)]
    assert not dead
    for field in D.DNCInterface._fields:
        values = [getattr(i, field) for i in ifaces if getattr(i, field) is not None]
        if field == "read_modes" and not links:
            continue
        assert any(v.grad is not None and v.grad.count_nonzero() > 0 for v in values), field

    # The checks above pass even with the state detached at every token: each token's own
    # write-then-read and the auxiliary losses reach every parameter. The interface of token
    # t' feeds position t' alone, so the loss at a later token t reaches it only through the
    # DNC state carried from t' to t.
    out = model(ids[:, :-1])
    iface = ifaces[-1]
    fields = [f for f in D.DNCInterface._fields if getattr(iface, f) is not None]
    t = cfg.seq_len - 4
    loss_t = F.cross_entropy(out.logits[:, t], ids[:, t + 1])
    grads = dict(zip(fields, torch.autograd.grad(loss_t, [getattr(iface, f) for f in fields])))
    for field, grad in grads.items():
        per_token = grad.abs().flatten(2).amax(-1)  # (B, T)
        assert per_token[:, :t].max() > 0, field  # some earlier token, every field
        assert per_token[:, t + 1:].max() == 0, field  # no later one
    # every earlier token's write vector (stored in every slot: content weights are > 0)
    assert (grads["write_vector"].abs().amax(-1)[:, :t] > 0).all()


@LINKS
def test_paired_init_and_tied_head(links):
    cfg = tiny_cfg(links)
    # Different caller RNG states: build_model must seed itself for the pair to match.
    torch.manual_seed(0)
    base = D.build_model(cfg, False)
    torch.manual_seed(1)
    dnc = D.build_model(cfg, True)
    base_sd, dnc_sd = base.transformer.state_dict(), dnc.transformer.state_dict()
    assert base_sd.keys() == dnc_sd.keys()
    for key in base_sd:
        assert torch.equal(base_sd[key], dnc_sd[key]), key
    for model in (base, dnc):
        assert model.lm_head.weight is model.transformer.wte.weight


@LINKS
def test_output_shapes(links):
    cfg = tiny_cfg(links)
    ids = random_ids(cfg)
    B, T, V, N = 2, cfg.seq_len, cfg.vocab_size, cfg.mem_slots
    with torch.no_grad():
        base = D.build_model(cfg, False).eval()(ids)
        dnc = D.build_model(cfg, True).eval()(ids)
    assert isinstance(base, D.LMOutput) and isinstance(dnc, D.LMOutput)
    assert base.logits.shape == (B, T, V)
    assert base.write_gate is None and base.write_weights is None and base.nomem_logits is None
    assert dnc.logits.shape == dnc.nomem_logits.shape == (B, T, V)
    assert dnc.write_gate.shape == (B, T)
    assert dnc.write_weights.shape == (B, T, N)
    # w^w = g^w [g^a a + (1 - g^a) c^w] with sum(a) <= 1 and sum(c^w) = 1, so 0 <= sum(w^w) <= g^w.
    gate, weights = dnc.write_gate, dnc.write_weights
    assert ((gate > 0) & (gate < 1)).all()
    assert (weights >= 0).all()
    assert (weights.sum(-1) <= gate + 1e-6).all()


@LINKS
def test_nomem_logits_is_model_without_read_path(links):
    cfg, model = tiny_model(True, links)
    ids = random_ids(cfg)
    ablated = copy.deepcopy(model)
    with torch.no_grad():
        ablated.read_proj.weight.zero_()
        ablated.read_proj.bias.zero_()
        out, abl = model(ids), ablated(ids)
        head_on_hidden = model.lm_head(model.transformer(ids).last_hidden_state)
    torch.testing.assert_close(abl.logits, out.nomem_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(head_on_hidden, out.nomem_logits, rtol=0, atol=1e-5)
    # The read path must contribute at init, else mem KL, routing target and memory grads are all zero.
    assert (out.logits - out.nomem_logits).abs().max() > 1e-5


@pytest.mark.parametrize("links", [False, True])
def test_the_dnc_adds_exactly_its_interface_and_read_projection(links):
    cfg = D.Config(temporal_links=links)
    extra = n_params(D.build_model(cfg, True)) - n_params(D.build_model(cfg, False))
    H, N, W, R = cfg.hidden_size, cfg.mem_slots, cfg.mem_width, cfg.num_reads
    # ξ: k^w, β^w, e, v (3W + 1), f (R), g^a, g^w (2), k^r (RW), β^r (R), π (3R with links)
    interface = 3 * W + 1 + R + 2 + R * W + R + (3 * R if links else 0)
    assert extra == (H * interface + interface) + (R * W * H + H)
    assert extra == (1_091_467 if not links else 1_091_467 + 12 * 768 + 12)


@LINKS
def test_realistic_small_forward_backward(links):
    # Reference memory size and the GPT-2 vocabulary, a small transformer, dropout active.
    cfg = D.Config(hidden_size=128, num_layers=2, num_heads=4, seq_len=64, temporal_links=links)
    model = D.build_model(cfg, True).train()
    ids = random_ids(cfg, length=cfg.seq_len + 1)
    out = model(ids[:, :-1])
    B, T, V, N, W = 2, cfg.seq_len, cfg.vocab_size, cfg.mem_slots, cfg.mem_width
    assert out.logits.shape == out.nomem_logits.shape == (B, T, V)
    assert out.write_gate.shape == (B, T) and out.write_weights.shape == (B, T, N)
    assert out.memory_state.memory.shape == (B, N, W)
    total, parts = D.compute_loss(out, ids[:, 1:], cfg, True)
    total.backward()
    assert set(parts) == {"lm", "routing", "entropy"}
    # at GPT-2's initialisation (std 0.02) the logits are nearly equal: the loss is ln V
    assert parts["lm"] == pytest.approx(math.log(V), abs=0.05)
    assert 0 < parts["routing"] < 1 and 0 < parts["entropy"] <= 1
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # With read_proj at zero the DNC model computes the baseline's logits, and with
    # controller_grad = 0 its memory losses do not reach GPT-2: the same dropout masks then
    # give every GPT-2 parameter the baseline's gradient, bit for bit.
    zero = dataclasses.replace(cfg, zero_read_proj=True)
    grads = []
    for use_dnc in (False, True):
        paired = D.build_model(zero, use_dnc).train()
        torch.manual_seed(0)
        paired_out = paired(ids[:, :-1])
        D.compute_loss(paired_out, ids[:, 1:], zero, use_dnc)[0].backward()
        grads.append({n: p.grad for n, p in paired.transformer.named_parameters()})
    assert paired_out.write_gate is not None  # the second model is the DNC one
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name
    assert min(g.norm() for g in grads[0].values()) > 0


def test_use_compile_matches_eager_and_compiles_the_step_once(monkeypatch):
    from torch._dynamo.utils import counters

    # Recompilation is decided by dynamo's guards, whatever the backend; aot_eager (autograd
    # traced, no C++ code generation) keeps this test at seconds. bench_speed.py's
    # train_compiled case runs the default inductor backend.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kw: compile_(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    # use_compile compiles dnc_step, which only the eager loop calls (dnc_kernel)
    cfg = tiny_cfg(True, use_compile=True, dnc_kernel="eager")
    compiled = D.build_model(cfg, True)
    eager = D.build_model(tiny_cfg(True, dnc_kernel="eager"), True)
    assert compiled.memory.step is not D.dnc_step
    ids = random_ids(cfg, length=cfg.seq_len + 1)
    graphs = []
    for _ in range(3):
        outs = [model(ids[:, :-1]) for model in (eager, compiled)]
        losses = [D.compute_loss(out, ids[:, 1:], cfg, True)[0] for out in outs]
        for loss in losses:
            loss.backward()
        assert torch.allclose(outs[0].logits, outs[1].logits, atol=1e-5)
        for p, q in zip(eager.parameters(), compiled.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    # the first token's state needs no gradient, the others do: two graphs, then none new
    assert graphs[0] >= 1 and graphs[1] == graphs[2] == graphs[0], graphs


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_controller_grad_scales_only_the_gradient_into_gpt2(scale):
    ids = random_ids(tiny_cfg(False))

    def trunk_grads(cfg):
        model = D.build_model(cfg, True)
        out = model(ids)
        # the write gate depends on GPT-2 only through the memory's interface
        out.write_gate.sum().backward()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                 for n, p in model.transformer.named_parameters()}
        return out, grads, model.memory.interface_proj.weight.grad

    full_out, full, full_iface = trunk_grads(tiny_cfg(False, controller_grad=1.0))
    out, scaled, iface = trunk_grads(tiny_cfg(False, controller_grad=scale))
    torch.testing.assert_close(out.logits, full_out.logits, rtol=0, atol=0)  # forward unchanged
    torch.testing.assert_close(iface, full_iface, rtol=1e-6, atol=0)  # the memory's own: all
    assert max(g.abs().max() for g in full.values()) > 1e-4
    for name in full:
        torch.testing.assert_close(scaled[name], scale * full[name], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("controller_grad", [0.0, 1.0])
def test_the_routing_loss_reaches_gpt2_only_through_controller_grad(controller_grad):
    """The routing loss trains the write gate. Its target is detached, so the logits carry
    none of its gradient; the gate reads GPT-2's hidden state through the interface, so the
    gradient reaches GPT-2's trunk exactly as far as controller_grad lets it."""
    cfg = tiny_cfg(False, controller_grad=controller_grad, lambda_routing=1.0,
                   lambda_entropy=0.0)
    model = D.build_model(cfg, True).train()
    ids = random_ids(cfg, length=cfg.seq_len + 1)
    out = model(ids[:, :-1])
    params = dict(model.named_parameters())
    grads = []
    for lam in (0.0, 1.0):
        total, _ = D.compute_loss(out, ids[:, 1:], dataclasses.replace(cfg, lambda_routing=lam),
                                  True)
        grads.append(dict(zip(params, torch.autograd.grad(
            total, list(params.values()), retain_graph=True, materialize_grads=True))))
    changed = {n for n in params if not torch.equal(grads[0][n], grads[1][n])}
    trunk = {f"transformer.{n}" for n, _ in model.transformer.named_parameters()}
    gate_row = model.memory.write_gate_index
    rows = (grads[1]["memory.interface_proj.weight"]
            != grads[0]["memory.interface_proj.weight"]).any(-1).nonzero()[:, 0].tolist()
    assert rows == [gate_row]  # within the interface, the write gate's row alone
    if controller_grad == 0:
        assert changed == {"memory.interface_proj.weight", "memory.interface_proj.bias"}
    else:
        assert changed - trunk == {"memory.interface_proj.weight", "memory.interface_proj.bias"}
        assert trunk <= changed  # every GPT-2 parameter below the memory gains its gradient


def test_zero_read_proj_makes_the_dnc_model_the_baseline_at_step_0_and_then_learns():
    cfg = tiny_cfg(False, zero_read_proj=True)
    base, dnc = D.build_model(cfg, False), D.build_model(cfg, True)
    ids = random_ids(cfg, length=cfg.seq_len + 1)
    out = dnc(ids[:, :-1])
    torch.testing.assert_close(out.logits, base(ids[:, :-1]).logits, rtol=0, atol=0)
    D.compute_loss(out, ids[:, 1:], cfg, True)[0].backward()
    assert dnc.read_proj.weight.grad.abs().max() > 0  # the read path can grow from zero
    default = D.build_model(tiny_cfg(False), True)
    assert default.read_proj.weight.abs().max() > 0


@pytest.mark.parametrize("use_dnc", [False, True])
def test_an_untied_head_starts_as_the_tied_one_and_then_learns_apart_from_the_embedding(use_dnc):
    tied, untied = (D.build_model(tiny_cfg(False, tie_embeddings=t), use_dnc) for t in (True, False))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    ids = random_ids(tiny_cfg(False), length=17)
    out = untied(ids[:, :-1])
    torch.testing.assert_close(out.logits, tied(ids[:, :-1]).logits, rtol=0, atol=0)
    D.compute_loss(out, ids[:, 1:], tiny_cfg(False, tie_embeddings=False), use_dnc)[0].backward()
    torch.optim.SGD(untied.parameters(), lr=1.0).step()
    head, embedding = untied.lm_head.weight, untied.transformer.wte.weight
    assert (head - embedding).abs().max() > 1e-3  # each moved by its own gradient
    assert (embedding - tied.transformer.wte.weight).abs().max() > 1e-3


def test_allocation_gate_bias_moves_the_allocation_gate_and_nothing_else():
    ids = random_ids(tiny_cfg(False))
    models = [D.build_model(tiny_cfg(False, allocation_gate_bias=b), True) for b in (0.0, 3.0)]
    with torch.no_grad():
        default, moved = (m.memory.interface(m.transformer(ids).last_hidden_state) for m in models)
    # the pre-activation moves by exactly the bias: the gate's logit shifts by 3
    torch.testing.assert_close(torch.logit(moved.allocation_gate.double()),
                               torch.logit(default.allocation_gate.double()) + 3.0,
                               rtol=0, atol=1e-4)
    for other in D.DNCInterface._fields:
        if other != "allocation_gate" and getattr(default, other) is not None:
            assert torch.equal(getattr(default, other), getattr(moved, other)), other


def test_without_a_routing_loss_training_skips_the_no_memory_logits():
    cfg = tiny_cfg(False, lambda_routing=0.0)
    model = D.build_model(cfg, True)
    ids = random_ids(cfg, length=cfg.seq_len + 1)
    train = model.train()(ids[:, :-1])
    assert train.nomem_logits is None
    total, parts = D.compute_loss(train, ids[:, 1:], cfg, True)
    assert set(parts) == {"lm", "entropy"}
    assert total.item() == pytest.approx(parts["lm"] + cfg.lambda_entropy * parts["entropy"])
    assert model.eval()(ids[:, :-1]).nomem_logits.shape == train.logits.shape  # mem_kl stays
    with_routing = D.build_model(tiny_cfg(False), True).train()(ids[:, :-1])
    assert with_routing.nomem_logits is not None


@pytest.mark.parametrize("layer", [1, 2])  # inside GPT-2, and at its head
def test_the_answer_readout_reads_the_reads_alone_and_changes_no_other_weight(layer):
    plain_cfg = tiny_cfg(False, lambda_routing=0.0, memory_layer=layer, controller_grad=1.0,
                         tie_embeddings=False)  # as --preset=recall
    cfg = dataclasses.replace(plain_cfg, answer_readout=0.5)
    plain, model = D.build_model(plain_cfg, True), D.build_model(cfg, True)
    before, after = plain.state_dict(), model.state_dict()
    assert set(after) - set(before) == {"readout.weight"}
    assert all(torch.equal(before[k], after[k]) for k in before)  # the seed's weights, all
    assert model.readout.weight.shape == (cfg.vocab_size, cfg.num_reads * cfg.mem_width)
    assert model.readout.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert plain.readout is None and D.build_model(cfg, False).readout is None
    other = D.build_model(dataclasses.replace(cfg, seed=cfg.seed + 1), True)
    assert not torch.equal(other.readout.weight, model.readout.weight)  # drawn from the seed

    reads = []
    model.memory.register_forward_hook(lambda module, args, out: reads.append(out.reads))
    ids = random_ids(cfg)
    answers = torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) < 0.3
    out = model.train()(ids, answers=answers)
    r = reads[0].detach().double()[answers].flatten(-2)  # (K_a, R W), row-major like the mask
    expected = r @ model.readout.weight.detach().double().T
    assert out.readout_logits.shape == (int(answers.sum()), cfg.vocab_size)
    torch.testing.assert_close(out.readout_logits.double(), expected, rtol=1e-5, atol=1e-7)
    # the model's own prediction is the one without the readout
    torch.testing.assert_close(out.logits, plain.train()(ids).logits, rtol=0, atol=0)
    assert model(ids).readout_logits is None  # no answers given, no readout
    # the readout's loss reaches the read keys and GPT-2 below the memory, not the LM head
    out.readout_logits.square().sum().backward()
    assert model.memory.interface_proj.weight.grad.abs().max() > 0
    assert model.transformer.h[0].mlp.c_fc.weight.grad.abs().max() > 0
    assert model.lm_head.weight.grad is None and model.read_proj.weight.grad is None


MEMORY_LAYERS = pytest.mark.parametrize("layer", [0, 1, 2, 3])  # of 3 blocks; 0 = the last


def layered_model(layer, **kw):
    cfg = tiny_cfg(True, num_layers=3, memory_layer=layer, lambda_routing=0.0, **kw)
    return cfg, D.build_model(cfg, True).eval()


@MEMORY_LAYERS
@pytest.mark.parametrize("context", [1, 3])  # interface_context, its earlier weights random
def test_memory_layer_keeps_the_model_causal_and_per_sequence(layer, context):
    cfg, model = layered_model(layer, interface_context=context)
    if context > 1:
        torch.nn.init.normal_(model.memory.context_proj.weight, std=0.3)
    ids = random_ids(cfg)
    with torch.no_grad():
        ref = model(ids)
        for k in (1, 7, cfg.seq_len - 1):
            edited = ids.clone()
            edited[0, k] = (ids[0, k] + 1) % cfg.vocab_size
            out = model(edited)
            for name in ("logits", "write_gate", "write_weights"):
                diff = (getattr(ref, name) - getattr(out, name)).abs()
                assert diff[0, :k].max() <= 1e-5, (name, k)
                assert diff[0, k:].max() > 1e-5, (name, k)
                assert diff[1].max() <= 1e-5, (name, k)


def read_gradient_by_position(model, ids, t):
    """|∂ logits_t / ∂ read_proj(r)_s| for every position s of sequence 0."""
    captured = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    handle = model.read_proj.register_forward_hook(keep)
    model(ids).logits[0, t].sum().backward()
    handle.remove()
    return captured[0].grad[0].abs().sum(-1)


@pytest.mark.parametrize("layer", [1, 2])
def test_memory_layer_below_the_head_lets_later_tokens_attend_to_earlier_reads(layer):
    cfg, model = layered_model(layer)
    t = 9
    grad = read_gradient_by_position(model, random_ids(cfg), t)
    assert (grad[:t] > 0).all()  # the blocks above carry every earlier read to position t
    assert (grad[t + 1:] == 0).all()  # and no later one


def test_memory_layer_at_the_head_adds_each_read_to_its_own_position_only():
    cfg, model = layered_model(3)
    t = 9
    grad = read_gradient_by_position(model, random_ids(cfg), t)
    assert grad[t] > 0 and grad[:t].max() == 0 and grad[t + 1:].max() == 0


def test_memory_layer_equal_to_num_layers_is_the_default_head_design():
    cfg_last, last = layered_model(3)
    cfg_zero, zero = layered_model(0)
    ids = random_ids(cfg_last)
    torch.testing.assert_close(last(ids).logits, zero(ids).logits, rtol=0, atol=0)
    assert not hasattr(last, "memory_ln")


@pytest.mark.parametrize("layer", [1, 2])
def test_memory_layer_with_zero_read_proj_starts_as_the_baseline(layer):
    cfg, model = layered_model(layer, zero_read_proj=True)
    base = D.build_model(cfg, False).eval()
    ids = random_ids(cfg)
    out = model(ids)
    torch.testing.assert_close(out.logits, base(ids).logits, rtol=0, atol=0)
    assert out.nomem_logits is None and out.write_gate.shape == ids.shape


@pytest.mark.parametrize("args, message", [
    (["--num_layers=2", "--memory_layer=3"], "memory_layer=3: use 1..num_layers"),
    (["--num_layers=2", "--memory_layer=-1"], "memory_layer=-1"),
    (["--num_layers=2", "--memory_layer=1", "--lambda_routing=0.1"], "set --lambda_routing=0")])
def test_memory_layer_bad_values_are_one_line_errors(args, message, capsys):
    assert D.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("layer", [0, 1])  # the reads at the head, or after block 1
def test_before_binding_from_the_interface_reads_this_token_alone(layer):
    """Before binding_from the model computes what the same weights compute with
    interface_context=1, even with the earlier tokens' weights non-zero, and those weights get
    no gradient at all (None: AdamW then keeps no state for them); from it on they are read,
    and learn. The step decides through the context that the model is given."""
    cfg = tiny_cfg(False, interface_context=3, binding_from=5, memory_layer=layer,
                   lambda_routing=0.0)
    wide = D.build_model(cfg, True)
    with torch.no_grad():
        wide.memory.context_proj.weight.normal_(std=0.3)
    plain = D.build_model(dataclasses.replace(cfg, interface_context=1, binding_from=0), True)
    plain.load_state_dict({k: v for k, v in wide.state_dict().items()
                           if not k.startswith("memory.context_proj")})
    ids = random_ids(cfg, length=17)
    grads = []
    for step in (4, 5):
        wide.zero_grad(set_to_none=True)
        logits = wide(ids[:, :-1], context=D.binding(cfg, step)).logits
        logits.square().mean().backward()
        grads.append(wide.memory.context_proj.weight.grad)
        difference = (logits - plain(ids[:, :-1]).logits).abs().max().item()
        assert (difference == 0) == (step == 4), (step, difference)
    assert grads[0] is None and grads[1].abs().max() > 0

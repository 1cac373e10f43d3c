"""Training as a paired comparison: what the DNC model's GPT-2 learns when its memory cannot
speak, step for step against the baseline."""
import dataclasses
import math
import tempfile

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import dnc_gpt2 as D

PAIRED = dict(hidden_size=32, num_layers=2, num_heads=2, mem_slots=8, mem_width=6, num_reads=2,
              seq_len=16, vocab_size=97, batch_size=4, lr=1e-2, dropout=0.1,
              grad_clip=0.5, zero_read_proj=True, lambda_routing=0.0, lambda_entropy=0.0)


def random_task(cfg):
    """A WikiTextTask on 600 random tokens (valid and test: the first 200 of them)."""
    ids = torch.randint(0, cfg.vocab_size, (600,), generator=torch.Generator().manual_seed(0))
    return D.WikiTextTask(cfg, {"train": ids, "valid": ids[:200], "test": ids[:200]}, "test")


def train_paired(cfg, use_dnc, task, steps):
    """k optimizer steps of train_step on the batches train_model would give them, with
    train_model's dropout seed; the DNC model's read projection frozen at zero."""
    model = D.build_model(cfg, use_dnc).train()
    if use_dnc:
        model.read_proj.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(cfg.seed)
    norms = []
    for step in range(1, steps + 1):
        data = D.step_data(task, cfg, step)
        _, norm, _ = D.train_step(model, model, optimizer, scaler, data, cfg, D.StopFlag(),
                                  torch.device("cpu"))
        norms.append(norm)
    return model, norms


def test_with_the_read_path_frozen_at_zero_gpt2_trains_exactly_as_the_baseline():
    """The paired design's premise: with read_proj at zero the memory adds nothing to the
    logits, and without the routing and entropy losses nothing else of the memory's reaches
    GPT-2 or the gradient norm that is clipped. Dropout draws the same masks only if the DNC
    path consumes no random numbers of its own; so after k steps on the same batches the
    two GPT-2s must be equal bit for bit."""
    cfg = D.Config(**PAIRED)
    task = random_task(cfg)
    (base, base_norms), (dnc, dnc_norms) = (train_paired(cfg, use_dnc, task, 3)
                                            for use_dnc in (False, True))
    assert base_norms == dnc_norms and min(base_norms) > cfg.grad_clip  # clipping was active
    assert dnc.read_proj.weight.abs().max() == 0 and dnc.read_proj.bias.abs().max() == 0
    start = D.build_model(cfg, False).transformer.state_dict()
    for name, value in base.transformer.state_dict().items():
        assert torch.equal(dnc.transformer.state_dict()[name], value), name
    assert not torch.equal(base.transformer.wte.weight, start["wte.weight"])  # it did train
    # the control: dropout is live, so the equality above depends on the masks being shared
    x = task.units[:2, :-1]
    assert not torch.equal(base(x).logits, base(x).logits)


def test_learning_rate_is_constant_then_a_half_cosine_down_to_min_lr():
    """lr_decay_from: `lr` before the decay starts, then `min_lr` + (lr - min_lr) cos²(π t / 2)
    with t the fraction of the decay steps taken (the half cosine, written another way)."""
    cfg = D.Config(lr=1e-3, min_lr=1e-4, lr_decay_from=11)
    rates = [D.learning_rate(cfg, step, 30) for step in range(1, 31)]
    for step, rate in zip(range(1, 31), rates):
        t = max(0, step - 11) / 19
        assert abs(rate - (1e-4 + 9e-4 * math.cos(math.pi * t / 2) ** 2)) < 1e-12
    assert rates[:11] == [1e-3] * 11 and rates[-1] == 1e-4
    assert all(a > b for a, b in zip(rates[10:], rates[11:]))  # strictly falling once begun
    assert {D.learning_rate(D.Config(lr=1e-3), s, 30) for s in range(1, 31)} == {1e-3}


def train_model_watching(cfg, use_dnc, watch):
    """train_model on random tokens; watch(optimizer) just before each AdamW step, as a list."""
    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append(watch(optimizer)))
    try:
        with tempfile.TemporaryDirectory() as root:
            run = dataclasses.replace(cfg, save_dir=root)
            D.train_model(run, use_dnc, random_task(run), torch.device("cpu"), D.StopFlag())
    finally:
        hook.remove()
    return seen


def test_every_optimizer_step_of_train_model_takes_the_scheduled_rate():
    """The rate each AdamW step actually used, seen from inside the optimizer."""
    cfg = D.Config(**{**PAIRED, "zero_read_proj": False, "max_steps": 6, "lr_decay_from": 3,
                      "min_lr": 1e-3, "save_every_steps": 100})
    used = train_model_watching(cfg, False, lambda optimizer: optimizer.param_groups[0]["lr"])
    assert used == [D.learning_rate(cfg, step, 6) for step in range(1, 7)]
    assert used[0] == cfg.lr and used[-1] == cfg.min_lr


def test_train_model_keeps_the_earlier_tokens_out_until_binding_from(monkeypatch):
    """train_model gives each step its binding context: seen from inside the optimizer, the
    earlier tokens' weights have no gradient on steps 1 and 2, and one on steps 3 and 4; they
    stay at their zero start until step 3 updates them."""
    cfg = D.Config(**{**PAIRED, "zero_read_proj": False, "max_steps": 4, "save_every_steps": 100,
                      "interface_context": 3, "binding_from": 3})
    built, build = [], D.build_model
    monkeypatch.setattr(D, "build_model", lambda *args: built.append(build(*args)) or built[-1])

    def context(optimizer):
        weight = built[0].memory.context_proj.weight
        return weight.grad is not None, bool(weight.abs().max() == 0)

    assert train_model_watching(cfg, True, context) == [(False, True), (False, True),
                                                        (True, True), (True, False)]


def test_runs_resumed_across_binding_from_end_as_an_uninterrupted_one(tmp_path):
    """A checkpoint saved before the switch holds no optimizer state for the earlier tokens'
    weights; resumed from it, the run gives them their fresh state at the switch, as the
    uninterrupted run does. Resumed after the switch, it reads them at once. Either way the
    final weights are equal bit for bit."""
    cfg = D.Config(**{**PAIRED, "zero_read_proj": False, "max_steps": 5, "save_every_steps": 2,
                      "interface_context": 3, "binding_from": 4, "dropout": 0.0})

    def train(root, max_steps):
        run = dataclasses.replace(cfg, save_dir=str(root), max_steps=max_steps, resume=True)
        return D.train_model(run, True, random_task(run), torch.device("cpu"), D.StopFlag())[0]

    whole = train(tmp_path / "whole", 5)
    train(tmp_path / "split", 2)
    train(tmp_path / "split", 4)
    resumed = train(tmp_path / "split", 5)
    assert resumed.memory.context_proj.weight.abs().max() > 0
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name

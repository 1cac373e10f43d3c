"""Training as a paired comparison: what the DNC model's GPT-2 learns when its memory cannot
speak, step for step against the baseline."""
import torch

import dnc_gpt2 as D

PAIRED = dict(hidden_size=32, num_layers=2, num_heads=2, mem_slots=8, mem_width=6, num_reads=2,
              seq_len=16, vocab_size=97, batch_size=4, lr=1e-2, dropout=0.1,
              grad_clip=0.5, zero_read_proj=True, lambda_routing=0.0, lambda_entropy=0.0)


def train_paired(cfg, use_dnc, units, steps):
    """k optimizer steps of train_step on the batches train_model would give them, with
    train_model's dropout seed; the DNC model's read projection frozen at zero."""
    model = D.build_model(cfg, use_dnc).train()
    if use_dnc:
        model.read_proj.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(cfg.seed)
    per_epoch = D.steps_in_epoch(units, cfg)
    norms = []
    for step in range(1, steps + 1):
        batches = D.micro_batches(units, cfg, step, per_epoch)
        _, norm, _ = D.train_step(model, model, optimizer, scaler, batches, cfg, D.StopFlag(),
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
    ids = torch.randint(0, cfg.vocab_size, (600,), generator=torch.Generator().manual_seed(0))
    units = D.training_units(ids, cfg)
    (base, base_norms), (dnc, dnc_norms) = (train_paired(cfg, use_dnc, units, 3)
                                            for use_dnc in (False, True))
    assert base_norms == dnc_norms and min(base_norms) > cfg.grad_clip  # clipping was active
    assert dnc.read_proj.weight.abs().max() == 0 and dnc.read_proj.bias.abs().max() == 0
    start = D.build_model(cfg, False).transformer.state_dict()
    for name, value in base.transformer.state_dict().items():
        assert torch.equal(dnc.transformer.state_dict()[name], value), name
    assert not torch.equal(base.transformer.wte.weight, start["wte.weight"])  # it did train
    # the control: dropout is live, so the equality above depends on the masks being shared
    x = units[:2, :-1]
    assert not torch.equal(base(x).logits, base(x).logits)

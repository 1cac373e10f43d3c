"""DNC state carried across segments (carry_memory)."""
import functools
import json
import math

import pytest
import torch
import torch.nn as nn

import dnc_gpt2 as D

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, mem_slots=8, mem_width=6, num_reads=2,
            seq_len=8, vocab_size=97, dropout=0.0, carry_memory=True, batch_size=2)


def segments(ids, cfg):
    body, _ = D.stream_rows(ids, cfg.batch_size)
    return D.row_segments(body, cfg.seq_len)


KERNELS = pytest.mark.parametrize("kernel", ["eager", "fused"])  # dnc_kernel of the scan


def carried_logits(model, ids, cfg):
    """Logits of every segment in order, the state carried, as one (rows, positions, V)."""
    model.eval()
    with torch.no_grad():
        return torch.cat([out.logits for _, out in D.carried_outputs(model, segments(ids, cfg))],
                         dim=1)


@KERNELS
@pytest.mark.parametrize("links", [False, True])
def test_no_token_influences_an_earlier_prediction_across_segments(links, kernel):
    cfg = D.Config(**TINY, temporal_links=links, dnc_kernel=kernel)
    model = D.build_model(cfg, True)
    ids = torch.randint(0, 97, (2 * 40 + 1,), generator=torch.Generator().manual_seed(0))
    before = carried_logits(model, ids, cfg)
    for k in (3, 11, 25):  # a token of row 0 in segments 1, 2 and 4
        changed = ids.clone()
        changed[k] = (changed[k] + 1) % 97
        after = carried_logits(model, changed, cfg)
        # column j of row 0 holds ids[j]: its logits may depend on ids[<= j] only
        torch.testing.assert_close(after[0, :k], before[0, :k], rtol=0, atol=1e-5)
        assert (after[0, k:] - before[0, k:]).abs().max() > 1e-5
        # and the change reaches the segments after its own, through the carried state alone
        next_segment = (k // cfg.seq_len + 1) * cfg.seq_len
        assert (after[0, next_segment:] - before[0, next_segment:]).abs().max() > 1e-6
        torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)  # rows are independent


@KERNELS
@pytest.mark.parametrize("links", [False, True])
def test_a_fact_in_segment_one_changes_the_reads_in_segment_three(links, kernel):
    cfg = D.Config(**TINY, temporal_links=links, dnc_kernel=kernel)
    model = D.build_model(cfg, True).eval()
    ids = torch.randint(0, 97, (2 * 40 + 1,), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[2] = (changed[2] + 5) % 97  # segment 1 of row 0
    reads = []
    for stream in (ids, changed):
        state = None
        with torch.no_grad():
            for seg in segments(stream, cfg)[:3]:
                h = model.transformer(input_ids=seg[:, :-1]).last_hidden_state
                r, _, _, state = model.memory(h, state)
        reads.append(r)
    # segment 3 never sees the changed token through attention: only the carried memory can
    assert (reads[0][0] - reads[1][0]).abs().max() > 1e-6
    torch.testing.assert_close(reads[0][1], reads[1][1], rtol=0, atol=0)


class Recorder(nn.Module):
    """The model, keeping every output it returns to train_step or evaluate."""

    def __init__(self, model):
        super().__init__()
        self.model, self.outputs = model, []

    def forward(self, *args, **kwargs):
        self.outputs.append(self.model(*args, **kwargs))
        return self.outputs[-1]


def third_segment_logits(ids, cfg, path):
    """Segment 3's logits when the first three segments of the rows go, in order, through one
    training step (as its micro-batches) or through evaluate()."""
    model = D.build_model(cfg, True)
    runner = Recorder(model)
    batches = segments(ids, cfg)[:3]
    if path == "train_step":
        D.train_step(runner, model, torch.optim.SGD(model.parameters(), lr=0.0),
                     torch.amp.GradScaler("cpu", enabled=False),
                     D.StepData(batches, [None] * len(batches), True), cfg, D.StopFlag(),
                     torch.device("cpu"))
    else:
        D.evaluate(runner, batches, carry=cfg.carry_memory)
    assert len(runner.outputs) == 3
    return runner.outputs[2].logits.detach()


@pytest.mark.parametrize("path", ["train_step", "evaluate"])
def test_without_carry_segment_three_is_blind_to_segment_one(path):
    ids = torch.randint(0, 97, (2 * 40 + 1,), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[2] = (changed[2] + 5) % 97  # in segment 1 of row 0, which segment 3 never attends to
    for carry in (False, True):
        cfg = D.Config(**{**TINY, "carry_memory": carry})
        before, after = (third_segment_logits(s, cfg, path) for s in (ids, changed))
        torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)  # rows are independent
        if carry:  # the control: the carried state does bring segment 1 into segment 3
            assert (after[0] - before[0]).abs().max() > 1e-6
        else:
            torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)


@pytest.mark.parametrize("length, rows", [(81, 2), (100, 3), (37, 4), (9, 2), (5, 8)])
def test_carried_evaluation_predicts_every_token_exactly_once(length, rows):
    ids = torch.arange(length)
    targets = [b[:, 1:] for b in D.carried_eval_batches(ids, 8, rows)]
    assert sorted(torch.cat([t.flatten() for t in targets]).tolist()) == list(range(1, length))
    for b in D.carried_eval_batches(ids, 8, rows):  # inputs precede their targets by one
        assert torch.equal(b[:, 1:], b[:, :-1] + 1)


def test_rows_are_contiguous_and_segments_follow_each_other():
    body, _ = D.stream_rows(torch.arange(81), 2)
    assert torch.equal(body[0], torch.arange(41)) and torch.equal(body[1], torch.arange(40, 81))
    segs = D.row_segments(body, 8)
    for a, b in zip(segs, segs[1:]):
        assert torch.equal(a[:, -1], b[:, 0])


@KERNELS
def test_training_steps_carry_the_state_and_detach_at_the_boundary(record_interfaces, kernel):
    cfg = D.Config(**TINY, bptt_segments=2, dnc_kernel=kernel)
    model = D.build_model(cfg, True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ids = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(0))
    task = D.WikiTextTask(cfg, {"train": ids, "valid": ids, "test": ids}, "test")
    batches, scored, _ = task.step_batches(1)
    assert len(batches) == 2 and torch.equal(batches[0][:, -1], batches[1][:, 0])
    with torch.no_grad():  # the expected loss: segment 2 starts from segment 1's final state
        first = model(batches[0][:, :-1])
        second = model(batches[1][:, :-1], memory_state=first.memory_state)
        expected = [D.compute_loss(o, b[:, 1:], cfg, True)[1]["lm"]
                    for o, b in ((first, batches[0]), (second, batches[1]))]
    interfaces = record_interfaces(model)
    # segment 1's own loss, with its weight in the step (half: both segments have 16 targets):
    # what segment 1's interface would get if the state were detached between the segments
    own = D.compute_loss(model(batches[0][:, :-1]), batches[0][:, 1:], cfg, True)[0] / 2
    fields = [f for f in D.DNCInterface._fields if getattr(interfaces[0], f) is not None]
    own_grads = torch.autograd.grad(own, [getattr(interfaces[0], f) for f in fields])
    interfaces.clear()

    sums, _, state = D.train_step(model, model, optimizer, scaler,
                                  D.StepData(batches, scored, True), cfg, D.StopFlag(),
                                  torch.device("cpu"))
    assert sums["lm"] / sums["tokens"] == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert not state.memory.requires_grad  # detached at the step boundary
    torch.testing.assert_close(state.memory, second.memory_state.memory, rtol=0, atol=1e-6)
    torch.testing.assert_close(state.usage, second.memory_state.usage, rtol=0, atol=1e-6)
    # within the step, segment 2's loss reaches segment 1's interface through the state
    assert len(interfaces) == 2
    for field, own_grad in zip(fields, own_grads):
        got = getattr(interfaces[0], field).grad
        assert (got - own_grad).abs().max() > 1e-3 * own_grad.abs().max(), field
    step_one = {f: getattr(interfaces[0], f).grad.clone() for f in fields}
    # across the step boundary, none: step 2's backward leaves step 1's gradients as they were
    D.train_step(model, model, optimizer, scaler, D.step_data(task, cfg, 2), cfg,
                 D.StopFlag(), torch.device("cpu"), state)
    assert len(interfaces) == 4 and interfaces[2].write_vector.grad.abs().max() > 0
    for field in fields:
        assert torch.equal(getattr(interfaces[0], field).grad, step_one[field]), field


def test_resuming_mid_epoch_keeps_the_carried_state(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, text in D.generated_corpus().items():
        (data / f"wiki.{split}.raw").write_text(text[:3000] if split == "train" else text[:600])
    common = ["--preset=smoke", "--carry_memory=true", "--hidden_size=32", "--num_layers=1",
              "--num_heads=2", "--mem_slots=8", "--mem_width=8", "--num_reads=2", "--seq_len=16",
              "--batch_size=2", "--save_every_steps=3", "--log_every_steps=1", "--dropout=0.0",
              "--inspect_tokens=8", f"--data_dir={data}"]

    def dirs(name):
        return [f"--save_dir={tmp_path / name}/ckpt", f"--plot_dir={tmp_path / name}/plots",
                f"--cache_dir={tmp_path}/cache"]

    assert D.main([*common, *dirs("whole"), "--max_steps=6"]) == 0
    assert D.main([*common, *dirs("split"), "--max_steps=3"]) == 0
    assert D.main([*common, *dirs("split"), "--max_steps=6", "--resume=true"]) == 0
    for name in ("GPT2_+_DNC", "GPT2_Baseline"):
        whole, split = (torch.load(tmp_path / run / "ckpt" / f"{name}_FINAL_step6.pt",
                                   weights_only=True) for run in ("whole", "split"))
        assert whole["history"]["val"][-1]["loss"] == pytest.approx(
            split["history"]["val"][-1]["loss"], abs=1e-6)
        for key, value in whole["model_state_dict"].items():
            torch.testing.assert_close(split["model_state_dict"][key], value, rtol=0, atol=1e-6)


def test_recall_preset_end_to_end_reports_accuracy_per_distance(tmp_path, monkeypatch):
    """recall.json's numbers per distance against a recomputation by hand from the FINAL
    checkpoints: each test episode fed segment by segment, the DNC state carried through
    them, each 4-digit code scored at its answer targets."""
    # the numbers are the subject here: the plots (test_recall's end-to-end test checks them)
    # and a second load of the tokenizer are most of the run's time
    for plot in ("plot_training_curves", "plot_memory_writes", "plot_recall"):
        monkeypatch.setattr(D, plot, lambda *args: None)
    monkeypatch.setattr(D, "load_tokenizer", functools.cache(D.load_tokenizer))
    args = ["--preset=recall", "--hidden_size=32", "--num_layers=1", "--num_heads=2",
            "--mem_slots=8", "--mem_width=8", "--max_steps=1", "--save_every_steps=1",
            "--recall_distances=20", "--recall_test_distances=20,70",
            f"--save_dir={tmp_path}/ckpt", f"--plot_dir={tmp_path}/plots",
            f"--cache_dir={tmp_path}/cache"]
    assert D.main(args) == 0
    report = json.loads((tmp_path / "plots" / "recall.json").read_text())["distances"]
    cfg = D.config_from_args(args)
    test = D.recall_generator(cfg, D.load_tokenizer()).split("test", [20, 70])
    assert set(report) == {"20", "70"}
    for name, model in D.final_models(cfg, torch.device("cpu")).items():
        for distance, episodes in test.items():
            nll, hit, row_of = [], [], []
            for rows in torch.arange(len(episodes.ids)).split(cfg.batch_size):  # as evaluated
                state = None
                for start in range(0, episodes.answers.shape[1], cfg.seq_len):
                    ids = episodes.ids[rows, start:start + cfg.seq_len + 1]
                    answers = episodes.answers[rows, start:start + cfg.seq_len]
                    # logits at the answers only, in row-major order (test_recall checks that
                    # they are the full logits there)
                    with torch.no_grad():
                        out = model(ids[:, :-1], memory_state=state, scored=answers)
                    state = out.memory_state
                    log_p = torch.log_softmax(out.logits, -1)  # fp32, as reported
                    targets = ids[:, 1:][answers]
                    nll.append(-log_p.gather(-1, targets[:, None])[:, 0].double())
                    hit.append(log_p.argmax(-1) == targets)
                    row_of.append(rows[answers.nonzero()[:, 0]])
            # back to each row's answers in time order: 4 digits of one query after another
            order = torch.sort(torch.cat(row_of), stable=True).indices
            code_nll = torch.cat(nll)[order].view(-1, 4).sum(-1)
            exact = torch.cat(hit)[order].view(-1, 4).all(-1)
            n, k = len(exact), int(exact.sum())
            p, z = k / n, 1.96
            centre = (p + z * z / (2 * n)) / (1 + z * z / n)
            half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
            row = report[str(distance)][name]
            assert row["queries"] == n == D.RECALL_EVAL_QUERIES["test"]
            assert row["exact"] == pytest.approx(k / n, abs=1e-12)
            first = exact.view(len(episodes.ids), -1)[:, 0].float().mean().item()
            assert row["first_query_exact"] == pytest.approx(first, abs=1e-12)
            # near initialisation the carried memory moves the code's NLL (about 43 nats) by
            # little (5e-5 at distance 20, 6e-6 at 70), hence the tolerance: the same batches
            # in the same precision leave only the order of the sums to differ
            assert row["answer_nll"] == pytest.approx(code_nll.mean().item(), rel=0, abs=1e-9)
            assert row["low"] == pytest.approx(max(0.0, centre - half), abs=1e-12)
            assert row["high"] == pytest.approx(min(1.0, centre + half), abs=1e-12)

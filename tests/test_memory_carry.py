"""DNC state carried across segments (carry_memory)."""
import pytest
import torch

import dnc_gpt2 as D

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, mem_slots=8, mem_width=6, num_reads=2,
            seq_len=8, vocab_size=97, dropout=0.0, carry_memory=True, batch_size=2)


def segments(ids, cfg):
    body, _ = D.stream_rows(ids, cfg.batch_size)
    return D.row_segments(body, cfg.seq_len)


def carried_logits(model, ids, cfg):
    """Logits of every segment in order, the state carried, as one (rows, positions, V)."""
    model.eval()
    with torch.no_grad():
        return torch.cat([out.logits for _, out in D.carried_outputs(model, segments(ids, cfg))],
                         dim=1)


@pytest.mark.parametrize("links", [False, True])
def test_no_token_influences_an_earlier_prediction_across_segments(links):
    cfg = D.Config(**TINY, temporal_links=links)
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


@pytest.mark.parametrize("links", [False, True])
def test_a_fact_in_segment_one_changes_the_reads_in_segment_three(links):
    cfg = D.Config(**TINY, temporal_links=links)
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
                r, _, _, state = model.memory.scan(h, state)
        reads.append(r)
    # segment 3 never sees the changed token through attention: only the carried memory can
    assert (reads[0][0] - reads[1][0]).abs().max() > 1e-6
    torch.testing.assert_close(reads[0][1], reads[1][1], rtol=0, atol=0)


def test_without_carry_segment_three_is_blind_to_segment_one():
    cfg = D.Config(**TINY)
    model = D.build_model(cfg, True).eval()
    ids = torch.randint(0, 97, (2 * 40 + 1,), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[2] = (changed[2] + 5) % 97
    with torch.no_grad():
        third = [model(segments(s, cfg)[2][:, :-1]).logits for s in (ids, changed)]
    torch.testing.assert_close(third[0], third[1], rtol=0, atol=0)


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


def test_training_steps_carry_the_state_and_detach_at_the_boundary():
    cfg = D.Config(**TINY, bptt_segments=2)
    model = D.build_model(cfg, True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    units = D.training_units(torch.randint(0, 97, (200,)), cfg)
    batches = D.micro_batches(units, cfg, 1, D.steps_in_epoch(units, cfg))
    assert len(batches) == 2 and torch.equal(batches[0][:, -1], batches[1][:, 0])
    with torch.no_grad():  # the expected loss: segment 2 starts from segment 1's final state
        first = model(batches[0][:, :-1])
        second = model(batches[1][:, :-1], memory_state=first.memory_state)
        expected = [D.compute_loss(o, b[:, 1:], cfg)[1]["lm"]
                    for o, b in ((first, batches[0]), (second, batches[1]))]
    sums, _, state = D.train_step(model, model, optimizer, scaler, batches, cfg, D.StopFlag(),
                                  torch.device("cpu"))
    assert sums["lm"] / sums["tokens"] == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert not state.memory.requires_grad  # detached at the step boundary
    torch.testing.assert_close(state.memory, second.memory_state.memory, rtol=0, atol=1e-6)
    torch.testing.assert_close(state.usage, second.memory_state.usage, rtol=0, atol=1e-6)


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

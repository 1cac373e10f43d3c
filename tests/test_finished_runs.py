"""Using what a run leaves: init_from (a Hugging Face GPT-2), eval_only, generate, and the live
view of a long run (history.json, training_curves.png and TensorBoard at every validation)."""
import contextlib
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

import dnc_gpt2 as D

TINY = ["--preset=smoke", "--hidden_size=32", "--num_layers=1", "--num_heads=2", "--mem_slots=8",
        "--mem_width=8", "--num_reads=2", "--seq_len=16", "--batch_size=4", "--max_steps=6",
        "--save_every_steps=3", "--log_every_steps=1", "--inspect_tokens=8", "--dropout=0.0"]


def main_output(args):
    """dnc_gpt2.main's exit status and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = D.main(args)
    return status, out.getvalue()


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run on a short local corpus: its folder, arguments and printed output."""
    root = tmp_path_factory.mktemp("finished")
    (root / "data").mkdir()
    for split, text in D.generated_corpus().items():
        (root / "data" / f"wiki.{split}.raw").write_text(text[:20000] if split == "train"
                                                         else text[:1500])
    args = [*TINY, f"--data_dir={root / 'data'}", f"--save_dir={root / 'ckpt'}",
            f"--plot_dir={root / 'plots'}", f"--cache_dir={root / 'cache'}"]
    written = []
    atomic_write = D.atomic_write

    def logged(path, write):  # what the live view wrote, and when
        atomic_write(path, write)
        if Path(path).name == "history.json":
            histories = json.loads(Path(path).read_text())["histories"]
            written.append({name: len(h["val"]) for name, h in histories.items()})

    D.atomic_write = logged
    try:
        status, printed = main_output(args)
    finally:
        D.atomic_write = atomic_write
    assert status == 0
    return root, args, printed, written


# ── init_from ────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny random GPT-2 saved by save_pretrained, as a user's local checkpoint would be."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=40, n_embd=24, n_layer=2,
                                       n_head=3, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(folder)
    return folder, model.eval()


@pytest.mark.parametrize("tie", ["true", "false"])
def test_init_from_takes_the_architecture_and_the_weights(tiny_gpt2, tie):
    folder, reference = tiny_gpt2
    cfg = D.config_from_args([f"--init_from={folder}", "--mem_slots=8", "--mem_width=6",
                              "--num_reads=2", "--seq_len=20", "--dropout=0",
                              f"--tie_embeddings={tie}"])
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.n_positions,
            cfg.vocab_size) == (24, 2, 3, 40, 50257)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        base = D.build_model(cfg, False).eval()(ids).logits
        dnc = D.build_model(cfg, True).eval()(ids).logits
    assert (expected - base).abs().max() <= 1e-5
    assert (expected - dnc).abs().max() <= 1e-5  # zero_read_proj: the baseline at step 0
    assert expected.std() > 0.01  # random weights, not a degenerate model


@pytest.mark.parametrize("args, message", [
    (["--hidden_size=64"], "--hidden_size=64: --init_from="),
    (["--num_layers=3"], "has num_layers=2; drop --num_layers"),
])
def test_init_from_refuses_an_architecture_that_contradicts_the_weights(tiny_gpt2, args,
                                                                        message, capsys):
    folder, _ = tiny_gpt2
    assert D.main([f"--init_from={folder}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_init_from_a_hub_name_offline_is_one_line_naming_the_fix(monkeypatch, capsys):
    monkeypatch.setattr(D, "hub_reachable", lambda timeout=3.0: False)
    assert D.main(["--init_from=gpt2"]) == 2
    err = capsys.readouterr().err
    assert "Hub is unreachable" in err and "save_pretrained" in err
    assert len(err.strip().splitlines()) == 1


def test_init_from_is_checked_on_resume(finished, tiny_gpt2):
    root, args, _, _ = finished
    final = root / "ckpt" / "GPT2_Baseline_FINAL_step6.pt"
    cfg = D.config_from_args(args)
    D.load_checkpoint(final, cfg, None)  # the same run loads
    other = D.Config(**{**cfg.__dict__, "init_from": str(tiny_gpt2[0])})
    with pytest.raises(D.ConfigError, match="made with init_from=, this run has init_from="):
        D.load_checkpoint(final, other, None)


# ── eval_only ────────────────────────────────────────────────────────────────────────────


def test_eval_only_reproduces_the_runs_test_table_and_writes_nothing(finished):
    root, args, printed, _ = finished
    before = snapshot(root)
    status, again = main_output([*args, "--eval_only=true"])
    assert status == 0
    table = printed[printed.index("FINAL COMPARISON"):printed.index("MEMORY WRITE")].strip()
    assert "Perplexity" in table and table in again
    assert snapshot(root) == before


def test_eval_only_from_init_from_without_checkpoints_evaluates_the_pretrained_model(
        finished, tiny_gpt2, tmp_path):
    root, _, _, _ = finished
    status, printed = main_output([f"--init_from={tiny_gpt2[0]}", "--seq_len=16", "--mem_slots=8",
                                   "--mem_width=8", "--num_reads=2", "--eval_only=true",
                                   f"--data_dir={root / 'data'}", f"--cache_dir={root / 'cache'}",
                                   f"--save_dir={tmp_path}/none", f"--plot_dir={tmp_path}/p"])
    assert status == 0
    rows = {line.split()[0]: line.split() for line in printed.splitlines()
            if line.strip().startswith(("Perplexity", "Top-1"))}
    assert rows["Perplexity"][2] == rows["Perplexity"][3]  # zero read_proj: the same model
    assert float(rows["Perplexity"][2]) > 1000  # a random tiny GPT-2
    assert list(tmp_path.iterdir()) == []


def test_eval_only_without_final_checkpoints_says_so(tmp_path, capsys):
    assert D.main([*TINY, f"--save_dir={tmp_path}", "--eval_only=true"]) == 2
    err = capsys.readouterr().err
    assert "no FINAL checkpoint of GPT2 Baseline" in err and len(err.strip().splitlines()) == 1


# ── generate ─────────────────────────────────────────────────────────────────────────────


def generation_model(seq_len=16, links=True):
    cfg = D.Config(hidden_size=32, num_layers=2, num_heads=2, mem_slots=8, mem_width=6,
                   num_reads=2, seq_len=seq_len, vocab_size=97, dropout=0.0,
                   temporal_links=links, temperature=0.0, max_new_tokens=10)
    return cfg, D.build_model(cfg, True).eval()


def test_greedy_generation_is_deterministic():
    cfg, model = generation_model()
    first, gates, _ = D.continue_text(model, [5, 17, 3], cfg)
    second, gates_again, _ = D.continue_text(model, [5, 17, 3], cfg)
    assert first == second and gates == gates_again
    assert len(first) == len(gates) == cfg.max_new_tokens


def test_generated_logits_equal_a_full_forward_over_the_text_so_far():
    cfg, model = generation_model(seq_len=32)
    prompt = [5, 17, 3, 44]
    new, gates, step_logits = D.continue_text(model, prompt, cfg)
    ids = prompt + new
    with torch.no_grad():
        for k, logits in enumerate(step_logits):
            out = model(torch.tensor([ids[:len(prompt) + k]]))
            torch.testing.assert_close(logits, out.logits[0, -1], rtol=1e-5, atol=1e-5)
            assert new[k] == int(out.logits[0, -1].argmax())
        full = model(torch.tensor([ids]))
    torch.testing.assert_close(torch.tensor(gates), full.write_gate[0, len(prompt):])


def test_generation_past_seq_len_carries_the_memory_from_segment_to_segment():
    cfg, model = generation_model(seq_len=6)
    prompt = [5, 17, 3, 44]
    new, _, step_logits = D.continue_text(model, prompt, cfg)
    ids = prompt + new
    with torch.no_grad():
        state = model(torch.tensor([ids[:6]])).memory_state  # the first full segment
        carried = model(torch.tensor([ids[6:11]]), memory_state=state).logits[0, -1]
        fresh = model(torch.tensor([ids[6:11]])).logits[0, -1]
    torch.testing.assert_close(step_logits[11 - len(prompt)], carried, rtol=1e-5, atol=1e-5)
    assert (carried - fresh).abs().max() > 1e-4  # the memory of segment 1 changed the step


def test_sampling_keeps_to_the_top_k_and_follows_the_seed():
    cfg = D.Config(temperature=1.0, top_k=3)
    logits = torch.tensor([0.0, 5.0, 1.0, 4.5, 4.0, -2.0])
    draws = [D.sample_next(logits, cfg, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == {1, 3, 4}
    again = [D.sample_next(logits, cfg, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again


def test_generate_prints_both_models_side_by_side_and_writes_nothing(finished):
    root, args, _, _ = finished
    before = snapshot(root)
    status, printed = main_output([*args, "--generate=Ada Lovelace was born in",
                                   "--max_new_tokens=5", "--temperature=0"])
    assert status == 0
    assert "GENERATION — greedy" in printed and "'Ada Lovelace was born in'" in printed
    rows = [line for line in printed.splitlines() if line[:6].strip().isdigit()]
    assert len(rows) == 5  # one row per generated token, the DNC's gate at each
    assert all(0 < float(row.split()[-2 if "█" in row else -1]) < 1 for row in rows)
    assert snapshot(root) == before


# ── the live view ────────────────────────────────────────────────────────────────────────


def test_history_is_rewritten_at_every_validation_not_only_at_the_end(finished):
    _, _, _, written = finished
    baseline, dnc = D.MODEL_NAMES
    # validations at steps 3 and 6 of each model, then the final report
    assert written[:4] == [{baseline: 1}, {baseline: 2}, {baseline: 2, dnc: 1},
                           {baseline: 2, dnc: 2}]


def test_tensorboard_records_train_and_validation_scalars(finished, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, args, _, _ = finished
    run_args = [a for a in args if not a.startswith(("--save_dir", "--plot_dir"))]
    status, _ = main_output([*run_args, f"--save_dir={tmp_path}/ckpt",
                             f"--plot_dir={tmp_path}/plots", "--tensorboard=true"])
    assert status == 0
    events = EventAccumulator(str(tmp_path / "plots" / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("GPT2_Baseline", "GPT2_+_DNC"):
        assert {f"{name}/train/loss", f"{name}/train/tok_s", f"{name}/valid/ppl"} <= tags
        assert [e.step for e in events.Scalars(f"{name}/valid/ppl")] == [3, 6]
    history = json.loads((tmp_path / "plots" / "history.json").read_text())["histories"]
    assert events.Scalars("GPT2_+_DNC/valid/ppl")[-1].value == pytest.approx(
        history["GPT2 + DNC"]["val"][-1]["ppl"], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line_naming_the_install(monkeypatch, capsys):
    real = D.importlib.util.find_spec
    monkeypatch.setattr(D.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert D.main(["--preset=smoke", "--tensorboard=true"]) == 2
    err = capsys.readouterr().err
    assert "pip install tensorboard" in err and len(err.strip().splitlines()) == 1

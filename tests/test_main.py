"""End to end: the smoke preset through main(), every output checked (once: it is the slow test)."""
import contextlib
import io
import json
import math

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F

import dnc_gpt2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def smoke_args(root):
    return ["--preset=smoke", f"--save_dir={root}/ckpt", f"--plot_dir={root}/plots",
            f"--cache_dir={root}/cache"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = dnc_gpt2.main(smoke_args(root))
    return status, root, stdout.getvalue()


@pytest.fixture(scope="module")
def smoke_data(smoke_run):
    """The smoke run's config, tokenizer and validation stream, as the run loaded them."""
    _, root, _ = smoke_run
    cfg = dnc_gpt2.config_from_args(smoke_args(root))
    tokenizer = dnc_gpt2.load_tokenizer()
    with contextlib.redirect_stdout(io.StringIO()):  # the generated corpus's banner
        streams, _ = dnc_gpt2.load_data(cfg, tokenizer)
    return cfg, tokenizer, streams["valid"]


def load_model(cfg, path):
    model = dnc_gpt2.build_model(cfg, "DNC" in path.name)
    model.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"])
    return model.eval()


def test_smoke_run_succeeds(smoke_run):
    status, _, stdout = smoke_run
    assert status == 0, stdout


def test_periodic_and_final_checkpoints_for_both_models(smoke_run):
    _, root, _ = smoke_run
    names = sorted(p.name for p in (root / "ckpt").glob("*.pt"))
    assert names == ["GPT2_+_DNC_FINAL_step16.pt", "GPT2_+_DNC_step8.pt",
                     "GPT2_Baseline_FINAL_step16.pt", "GPT2_Baseline_step8.pt"]
    ckpt = torch.load(root / "ckpt" / "GPT2_+_DNC_FINAL_step16.pt", weights_only=True)
    assert ckpt["global_step"] == 16 and ckpt["val_ppl"] > 1
    assert ckpt["data_source"] == "generated corpus (not WikiText-2)"
    assert {"model_state_dict", "optimizer_state_dict", "epoch"} <= ckpt.keys()


@pytest.mark.parametrize("name", ["training_curves.png", "memory_writes.png"])
def test_plots_are_valid_pngs(smoke_run, name):
    _, root, _ = smoke_run
    path = root / "plots" / name
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 400


def test_history_holds_train_and_validation_rows(smoke_run, smoke_data):
    _, root, _ = smoke_run
    cfg, _, valid = smoke_data
    saved = json.loads((root / "plots" / "history.json").read_text())
    train_steps = list(range(cfg.log_every_steps, cfg.max_steps + 1, cfg.log_every_steps))
    val_steps = sorted({*range(cfg.save_every_steps, cfg.max_steps + 1, cfg.save_every_steps),
                        cfg.max_steps})
    assert (train_steps, val_steps) == (list(range(2, 17, 2)), [8, 16])  # the smoke preset
    for name in dnc_gpt2.MODEL_NAMES:
        history = saved["histories"][name]
        assert [r["step"] for r in history["train"]] == train_steps
        assert [r["step"] for r in history["val"]] == val_steps
        for r in history["train"]:
            assert 0 <= r["top1_acc"] <= 1 and r["ppl"] == pytest.approx(math.exp(r["loss"]))
        # each validation row: its checkpoint's val_ppl, and the loss of that checkpoint's
        # model over the validation windows, token-weighted, computed here from its logits
        prefix = name.replace(" ", "_")
        for row in history["val"]:
            final = "_FINAL" if row["step"] == cfg.max_steps else ""
            path = root / "ckpt" / f"{prefix}{final}_step{row['step']}.pt"
            assert torch.load(path, weights_only=True)["val_ppl"] == row["ppl"]
            model, nll, tokens = load_model(cfg, path), 0.0, 0
            with torch.no_grad():
                for batch in dnc_gpt2.eval_batches(valid, cfg.seq_len, cfg.batch_size):
                    logits = model(batch[:, :-1]).logits
                    nll += F.cross_entropy(logits.flatten(0, 1).double(), batch[:, 1:].flatten(),
                                           reduction="sum").item()
                    tokens += batch[:, 1:].numel()
            assert tokens == len(valid) - 1 == row["tokens"]
            assert row["loss"] == pytest.approx(nll / tokens, rel=1e-5)
        assert history["val"][0]["loss"] != history["val"][1]["loss"]


def test_table_has_every_row_and_names_the_data(smoke_run):
    _, _, stdout = smoke_run
    assert "FINAL COMPARISON — Baseline GPT2 vs GPT2 + DNC" in stdout
    assert "test split · generated corpus (not WikiText-2)" in stdout
    for label, _, _, _ in dnc_gpt2.TABLE_ROWS:
        assert f"  {label}" in stdout, label
    dnc_only = [line for line in stdout.splitlines() if line.startswith("  Avg Write Gate")]
    assert len(dnc_only) == 1 and "—" in dnc_only[0]


def test_write_inspection_shows_gates_of_real_tokens(smoke_run, smoke_data):
    _, root, stdout = smoke_run
    cfg, tokenizer, valid = smoke_data
    section = stdout.split("MEMORY WRITE INSPECTION")[1].splitlines()
    rows = [line for line in section[3:] if line.strip() and not line.startswith("plots:")]
    # the snippet: a prose line of the validation text, not a heading
    snippet = dnc_gpt2.inspection_snippet(tokenizer, valid, cfg.inspect_tokens)
    text = tokenizer.decode(snippet.tolist())
    assert 10 <= len(snippet) <= cfg.inspect_tokens and text in tokenizer.decode(valid.tolist())
    assert not text.strip().startswith("=")
    model = load_model(cfg, root / "ckpt" / f"GPT2_+_DNC_FINAL_step{cfg.max_steps}.pt")
    with torch.no_grad():
        gates = model(snippet.unsqueeze(0)).write_gate[0].tolist()
    assert len(rows) == len(snippet)
    for line, token_id, gate in zip(rows, snippet.tolist(), gates):
        token = tokenizer.decode([token_id])
        # the row: the token (escaped, at most 20 characters), its gate, a bar of 30 per 1.0
        assert line[2:22].rstrip() == repr(token.strip() or token)[1:-1][:20], line
        assert float(line[22:29]) == pytest.approx(gate, abs=5e-4), line
        assert line[29:].strip() == "█" * int(gate * dnc_gpt2.BAR_SCALE), line
    assert max(gates) - min(gates) > 1e-3  # the gates tell the tokens apart

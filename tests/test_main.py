"""End to end: the smoke preset through main(), every output checked (once: it is the slow test)."""
import contextlib
import io
import json

import matplotlib.image
import pytest
import torch

import dnc_gpt2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    args = ["--preset=smoke", f"--save_dir={root}/ckpt", f"--plot_dir={root}/plots",
            f"--cache_dir={root}/cache"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = dnc_gpt2.main(args)
    return status, root, stdout.getvalue()


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


def test_history_holds_train_and_validation_rows(smoke_run):
    _, root, _ = smoke_run
    saved = json.loads((root / "plots" / "history.json").read_text())
    for name in dnc_gpt2.MODEL_NAMES:
        history = saved["histories"][name]
        assert [r["step"] for r in history["train"]] == list(range(2, 17, 2))
        assert [r["step"] for r in history["val"]] == [8, 16]
        assert all(0 <= r["top1_acc"] <= 1 and r["loss"] > 0 for r in history["train"])


def test_table_has_every_row_and_names_the_data(smoke_run):
    _, _, stdout = smoke_run
    assert "FINAL COMPARISON — Baseline GPT2 vs GPT2 + DNC" in stdout
    assert "test split · generated corpus (not WikiText-2)" in stdout
    for label, _, _, _ in dnc_gpt2.TABLE_ROWS:
        assert f"  {label}" in stdout, label
    dnc_only = [line for line in stdout.splitlines() if line.startswith("  Avg Write Gate")]
    assert len(dnc_only) == 1 and "—" in dnc_only[0]


def test_write_inspection_shows_gates_of_real_tokens(smoke_run):
    _, _, stdout = smoke_run
    section = stdout.split("MEMORY WRITE INSPECTION")[1].splitlines()
    rows = [line for line in section[3:] if line.strip() and not line.startswith("plots:")]
    assert len(rows) >= 10
    gates = [float(line.split()[-1]) if "█" not in line else float(line.split()[-2]) for line in rows]
    assert all(0 < g < 1 for g in gates)

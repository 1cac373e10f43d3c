"""DDP through torchrun on this CPU (gloo): two processes against one with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dnc_gpt2

REPO = Path(__file__).resolve().parent.parent
TINY = ["--preset=smoke", "--hidden_size=32", "--num_layers=1", "--num_heads=2", "--mem_slots=8",
        "--mem_width=8", "--num_reads=2", "--seq_len=16", "--batch_size=4", "--max_steps=6",
        "--save_every_steps=3", "--log_every_steps=1", "--inspect_tokens=8", "--dropout=0.0"]


def write_data(root):
    texts = dnc_gpt2.generated_corpus()
    root.mkdir()
    for split, text in texts.items():
        (root / f"wiki.{split}.raw").write_text(text[:20000] if split == "train" else text[:1500])
    return root


def run(tmp, name, launcher, extra=()):
    out = tmp / name
    out.mkdir()
    args = [*TINY, f"--data_dir={tmp / 'data'}", f"--save_dir={out}/ckpt",
            f"--plot_dir={out}/plots", f"--cache_dir={out}/cache", *extra]
    env = {**os.environ, "DDP_DRIVER_OUT": str(out), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, str(REPO / "tests" / "ddp_driver.py"), *args], env=env,
                            cwd=tmp, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (out / "stdout.txt").write_text(result.stdout)
    history = json.loads((out / "plots" / "history.json").read_text())["histories"]
    return out, history


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    write_data(tmp / "data")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return {"ddp": run(tmp, "ddp", [*torchrun, "--nproc_per_node=2"]),
            "ddp1": run(tmp, "ddp1", [*torchrun, "--nproc_per_node=1"]),
            "single": run(tmp, "single", [sys.executable]),
            "accum": run(tmp, "accum", [sys.executable], ["--grad_accum_steps=2"])}


def test_ranks_end_with_identical_parameters(runs):
    out, _ = runs["ddp"]
    for use_dnc in (0, 1):
        assert json.loads((out / f"check-{use_dnc}.json").read_text())["param_max_diff"] == 0


def test_torchrun_with_one_process_still_trains_through_ddp(runs):
    # the GPU check runs torchrun --nproc_per_node=1: it must exercise the DDP path, not skip it
    out, _ = runs["ddp1"]
    for use_dnc in (0, 1):
        assert json.loads((out / f"check-{use_dnc}.json").read_text())["wrapped"] == \
            "DistributedDataParallel"
    assert "DDP over 1 process(es) (gloo)" in (out / "stdout.txt").read_text()
    assert "DDP" not in (runs["single"][0] / "stdout.txt").read_text()


def test_only_rank_zero_writes_files(runs):
    out, _ = runs["ddp"]
    written = (out / "writes-rank0.txt").read_text().splitlines()
    assert any(p.endswith("GPT2_+_DNC_FINAL_step6.pt") for p in written)
    assert not (out / "writes-rank1.txt").exists()


@pytest.mark.parametrize("other", ["ddp", "ddp1", "accum"])
def test_loss_curve_equals_single_process_with_same_global_batch(runs, other):
    _, single = runs["single"]
    _, history = runs[other]
    for name in dnc_gpt2.MODEL_NAMES:
        losses = [r["loss"] for r in history[name]["train"]]
        reference = [r["loss"] for r in single[name]["train"]]
        assert len(losses) == len(reference) == 6
        assert losses == pytest.approx(reference, abs=1e-4)
        assert history[name]["val"][-1]["loss"] == pytest.approx(
            single[name]["val"][-1]["loss"], abs=1e-4)


def test_sharded_validation_equals_one_process_evaluating_everything(runs):
    out, _ = runs["ddp"]
    for use_dnc in (0, 1):
        check = json.loads((out / f"check-{use_dnc}.json").read_text())
        assert check["sharded"]["tokens"] == check["whole"]["tokens"]
        for key, value in check["whole"].items():
            assert check["sharded"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_ddp_trains_with_the_earlier_tokens_out_until_binding_from(tmp_path):
    """Before binding_from the earlier tokens' weights are not in the graph, which DDP refuses
    unless told to look for unused parameters; it must train through the switch, the ranks
    ending equal."""
    write_data(tmp_path / "data")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    out, _ = run(tmp_path, "ddp", torchrun, ["--interface_context=3",
                                            "--binding_from=4"])
    assert json.loads((out / "check-1.json").read_text())["param_max_diff"] == 0

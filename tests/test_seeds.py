"""--seeds: the paired comparison once per seed, the summary over seeds, results.json, resume."""
import contextlib
import io
import json
import math
from pathlib import Path

import pytest

import dnc_gpt2 as D

TINY = ["--preset=smoke", "--hidden_size=32", "--num_layers=1", "--num_heads=2", "--mem_slots=8",
        "--mem_width=8", "--num_reads=2", "--seq_len=16", "--batch_size=4", "--max_steps=4",
        "--save_every_steps=2", "--log_every_steps=1", "--inspect_tokens=8"]


def quiet_main(args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = D.main(args)
    return status, out.getvalue()


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds_data")
    for split, text in D.generated_corpus().items():
        (root / f"wiki.{split}.raw").write_text(text[:20000] if split == "train" else text[:1500])
    return [*TINY, f"--data_dir={root}", f"--cache_dir={root / 'cache'}"]


def run_args(data_args, folder, *extra):
    return [*data_args, f"--save_dir={folder}/ckpt", f"--plot_dir={folder}/plots", *extra]


@pytest.fixture(scope="module")
def two_seeds(data_args, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_seeds")
    status, printed = quiet_main(run_args(data_args, folder, "--seeds=5,7"))
    assert status == 0
    return folder, json.loads((folder / "plots" / "results.json").read_text()), printed


def test_summary_and_paired_delta_equal_a_hand_computation(two_seeds):
    _, payload, printed = two_seeds
    assert payload["seeds"] == [5, 7] and set(payload["per_seed"]) == {"5", "7"}
    base, dnc = D.MODEL_NAMES
    for name in (base, dnc):
        for key, stats in payload["summary"][name].items():
            a, b = (payload["per_seed"][s][name][key] for s in ("5", "7"))
            assert stats["mean"] == pytest.approx((a + b) / 2, rel=1e-12, abs=1e-15)
            assert stats["std"] == pytest.approx(abs(a - b) / math.sqrt(2), rel=1e-9, abs=1e-15)
    for key, stats in payload["paired_delta"].items():
        d = [(payload["per_seed"][s][dnc][key] - payload["per_seed"][s][base][key])
             / abs(payload["per_seed"][s][base][key]) for s in ("5", "7")]
        assert stats["mean"] == pytest.approx(sum(d) / 2, rel=1e-9, abs=1e-15)
        assert stats["std"] == pytest.approx(abs(d[0] - d[1]) / math.sqrt(2), rel=1e-9, abs=1e-15)
    assert "avg_gate" in payload["summary"][dnc] and "avg_gate" not in payload["paired_delta"]
    assert payload["per_seed"]["5"][base]["ppl"] != payload["per_seed"]["7"][base]["ppl"]
    assert "OVER 2 SEEDS (5, 7)" in printed and printed.index("seed 5: ") < printed.index("OVER")


def test_a_check_mark_only_where_the_dnc_is_better_in_every_seed():
    base, dnc = D.MODEL_NAMES
    per_seed = {"1": {base: {"ppl": 10.0}, dnc: {"ppl": 9.0}},
                "2": {base: {"ppl": 10.0}, dnc: {"ppl": 10.5}}}
    assert not D.better_in_every_seed(per_seed, "ppl", "lower")
    per_seed["2"][dnc]["ppl"] = 9.9
    assert D.better_in_every_seed(per_seed, "ppl", "lower")
    assert "✓" in D.seeds_table(D.seed_summary(per_seed))


def test_each_seed_is_the_single_seed_run(two_seeds, data_args, tmp_path):
    folder, payload, _ = two_seeds
    cfg = D.config_from_args(run_args(data_args, tmp_path, "--seed=7"))
    with contextlib.redirect_stdout(io.StringIO()):
        results = D.run(cfg, D.StopFlag())
    single = {name: D.summary_metrics(results[name]) for name in D.MODEL_NAMES}
    assert single == payload["per_seed"]["7"]
    seeded = json.loads((folder / "plots" / "seed_7" / "history.json").read_text())
    alone = json.loads((tmp_path / "plots" / "history.json").read_text())
    assert seeded["histories"] == alone["histories"]
    assert (folder / "ckpt" / "seed_7" / "GPT2_+_DNC_FINAL_step4.pt").is_file()
    assert (folder / "plots" / "training_curves.png").stat().st_size > 10_000


def test_one_seed_prints_the_usual_table_and_no_summary(data_args, tmp_path):
    status, printed = quiet_main(run_args(data_args, tmp_path, "--seeds=3"))
    assert status == 0
    assert "FINAL COMPARISON" in printed and "OVER" not in printed
    payload = json.loads((tmp_path / "plots" / "results.json").read_text())
    assert payload["summary"][D.MODEL_NAMES[0]]["ppl"]["std"] is None


def test_resume_between_seeds_ends_as_the_uninterrupted_run(two_seeds, data_args, tmp_path,
                                                           monkeypatch):
    _, reference, _ = two_seeds
    run = D.run

    def stopped_at_seed_7(cfg, stop):
        if cfg.seed == 7:
            stop.signum = 15
            raise D.Interrupted("stopped by a signal before seed 7")
        return run(cfg, stop)

    monkeypatch.setattr(D, "run", stopped_at_seed_7)
    assert quiet_main(run_args(data_args, tmp_path, "--seeds=5,7"))[0] == 128 + 15
    partial = json.loads((tmp_path / "plots" / "results.json").read_text())
    assert list(partial["per_seed"]) == ["5"]
    monkeypatch.setattr(D, "run", run)
    status, printed = quiet_main(run_args(data_args, tmp_path, "--seeds=5,7", "--resume=true"))
    assert status == 0 and "── seed 5" not in printed and "── seed 7" in printed
    assert json.loads((tmp_path / "plots" / "results.json").read_text()) == reference


@pytest.mark.parametrize("seeds, message", [("1,2,1", "repeats a seed"),
                                            ("1,two", "use integers"), ("1.5", "use integers")])
def test_bad_seeds_are_one_line_exit_2(seeds, message, capsys):
    assert D.main(["--preset=smoke", f"--seeds={seeds}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1

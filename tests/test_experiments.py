"""The research tools in experiments/, through their public functions: each trains, loads and
scores the models as the script itself does."""
import json
import sys
from pathlib import Path

import pytest
import torch

import dnc_gpt2 as D

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import recall_experiment  # noqa: E402
import recall_shift_eval  # noqa: E402

TINY_RECALL = ["--preset=recall", "--hidden_size=32", "--num_layers=1", "--num_heads=2",
               "--mem_slots=8", "--mem_width=8", "--max_steps=3", "--save_every_steps=3",
               "--binding_from=2", "--batch_size=4", "--recall_distances=70",
               "--recall_test_distances=20,70"]


def dirs(path):
    return [f"--save_dir={path}/ckpt", f"--plot_dir={path}/plots", f"--cache_dir={path}/cache"]


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    """Both models trained by the script itself: its recall.json and its checkpoints."""
    path = tmp_path_factory.mktemp("script")
    assert D.main([*TINY_RECALL, *dirs(path)]) == 0
    return path, json.loads((path / "plots" / "recall.json").read_text())


@pytest.mark.parametrize("model, name", [("baseline", "GPT2 Baseline"), ("dnc", "GPT2 + DNC")])
def test_recall_experiment_trains_and_tests_the_model_the_script_trains(model, name, script_run,
                                                                        tmp_path, capsys):
    _, report = script_run
    capsys.readouterr()
    assert recall_experiment.main([model, *TINY_RECALL, *dirs(tmp_path)]) == 0
    out = capsys.readouterr().out  # the data line and the checkpoint line, then the JSON
    result = json.loads(out[out.index("{\n"):])
    assert result["train_s"] >= 0 and [row["step"] for row in result["val"]] == [3]
    assert result["test"]["recall"].keys() == report["distances"].keys()
    for distance, row in report["distances"].items():
        for key in ("exact", "answer_nll", "first_query_exact"):
            assert result["test"]["recall"][distance][key] == pytest.approx(row[name][key],
                                                                           rel=1e-6)


@pytest.mark.parametrize("argv", [[], ["gpt3"], ["dnc", "--hidden_size=-1"]])
def test_recall_experiment_refuses_bad_input_with_exit_2(argv, tmp_path, capsys):
    assert recall_experiment.main([*argv[:1], *argv[1:], *dirs(tmp_path)] if argv else []) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("usage" in err or "--hidden_size" in err)


def test_recall_experiment_never_overwrites_an_earlier_run(script_run, capsys):
    path, _ = script_run
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*.pt")}
    assert recall_experiment.main(["dnc", *TINY_RECALL, *dirs(path)]) == 2
    assert "--resume=true" in capsys.readouterr().err
    assert before and {p: p.stat().st_mtime_ns for p in path.rglob("*.pt")} == before


def final_dnc_checkpoint(path):
    return next(p for p in (path / "ckpt").glob("GPT2_+_DNC_FINAL_step*.pt"))


def test_shift_eval_scores_the_fixed_layout_as_the_script_did(script_run):
    path, report = script_run
    checkpoint = torch.load(final_dnc_checkpoint(path), map_location="cpu", weights_only=True)
    cfg = D.checkpoint_config(checkpoint["config"], "ckpt")
    model = D.build_model(cfg, True)
    model.load_state_dict(checkpoint["model_state_dict"])
    exact = recall_shift_eval.exact_by_layout(model.eval(), cfg, D.load_tokenizer())
    assert set(exact) == {False, True}
    assert list(exact[True]) == list(exact[False]) == [20, 70]
    for distance, row in report["distances"].items():
        assert exact[False][int(distance)] == pytest.approx(row["GPT2 + DNC"]["exact"])
    assert all(0 <= e <= 1 for layout in exact.values() for e in layout.values())


def test_shift_eval_prints_both_layouts(script_run, capsys):
    path, report = script_run
    capsys.readouterr()
    assert recall_shift_eval.main([str(final_dnc_checkpoint(path))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["recall_shift=False", "recall_shift=True"]
    fixed = lines[0].split()[1:]
    assert fixed[0::2] == ["20:", "70:"]
    assert [float(e) for e in fixed[1::2]] == pytest.approx(
        [report["distances"][d]["GPT2 + DNC"]["exact"] for d in ("20", "70")], abs=5e-4)


def test_shift_eval_refuses_what_it_cannot_score_with_exit_2(script_run, tmp_path, capsys):
    path, _ = script_run
    baseline = next((path / "ckpt").glob("GPT2_Baseline_FINAL_step*.pt"))
    removed = torch.load(final_dnc_checkpoint(path), map_location="cpu", weights_only=True)
    removed["config"]["lambda_write"] = 0.5
    torch.save(removed, tmp_path / "old.pt")
    capsys.readouterr()
    for argv, needle in [([], "usage"), ([str(tmp_path / "absent.pt")], "usage"),
                         ([str(baseline)], "not a GPT2 + DNC"),
                         ([str(tmp_path / "old.pt")], D.CLEANUP.tag)]:
        assert recall_shift_eval.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err


# ─── recall_start_probe ───────────────────────────────────────────────────────────────────

import recall_start_probe  # noqa: E402

PROBE_ARGS = [*TINY_RECALL, "--num_layers=2", "--max_steps=2", "--save_every_steps=2",
              "--binding_from=0", "--recall_facts=1", "--recall_shift=false"]


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A tiny recall run whose DNC reads after block 1, trained two steps by the script."""
    path = tmp_path_factory.mktemp("probe")
    assert D.main([*PROBE_ARGS, *dirs(path)]) == 0
    return path, final_dnc_checkpoint(path)


@pytest.mark.parametrize("context", [False, True])  # the interface's earlier tokens out / in
def test_the_probe_replays_the_memory_the_model_computes(probed, context):
    _, checkpoint = probed
    model, cfg, step = recall_start_probe.load_dnc(checkpoint)
    episodes = recall_start_probe.probe_episodes(cfg, D.load_tokenizer())
    with torch.no_grad():
        run = recall_start_probe.replay(model, episodes, cfg, context)
        state, gates, writes = None, [], []
        for ids, _ in D.episode_segments(episodes, cfg.seq_len):
            out = model(ids[:, :-1], memory_state=state, context=context)
            state = out.memory_state
            gates.append(out.write_gate)
            writes.append(out.write_weights)
    assert step == 2 and episodes.ids.shape[0] == recall_start_probe.EPISODES
    torch.testing.assert_close(run["write_gate"], torch.cat(gates, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(run["write_weights"], torch.cat(writes, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(run["read_weights"][:, -1], state.read_weights, rtol=0, atol=1e-5)


def test_the_probe_measures_the_reads_at_the_answers(probed):
    _, checkpoint = probed
    model, cfg, _ = recall_start_probe.load_dnc(checkpoint)
    episodes = recall_start_probe.probe_episodes(cfg, D.load_tokenizer())
    signals = recall_start_probe.start_signals(model, episodes, cfg)
    with torch.no_grad():
        run = recall_start_probe.replay(model, episodes, cfg)
    # the right digit's slot and all code slots, summed here slot by slot, episode by episode
    code_class = D.TOKEN_CLASSES.index("fact code")
    right, codes = [], []
    for row in range(episodes.ids.shape[0]):
        code_positions = [t for t in range(episodes.answers.shape[1])
                          if episodes.classes[row, t] == code_class]
        answers = [t for t in range(episodes.answers.shape[1]) if episodes.answers[row, t]]
        assert len(code_positions) == len(answers) == 4
        for j, p in enumerate(answers):
            for head in range(cfg.num_reads):
                for n in range(cfg.mem_slots):
                    read = run["read_weights"][row, p, head, n].item()
                    right.append(read * run["write_weights"][row, code_positions[j], n].item())
                    codes.append(read * sum(run["write_weights"][row, c, n].item()
                                            for c in code_positions))
    queries = episodes.ids.shape[0] * 4
    assert signals["right mass"] == pytest.approx(sum(right) / queries, rel=1e-5)
    assert signals["code mass"] == pytest.approx(sum(codes) / queries, rel=1e-5)
    assert 0 < signals["right mass"] < signals["code mass"] <= cfg.num_reads
    assert 0 < signals["read entropy"] <= 1 and signals["read strength"] >= 1
    assert all(0 < signals[f"gate {c}"] < 1 for c in ("filler", "fact code", "fact name"))


def test_the_probe_refuses_what_it_cannot_probe_with_exit_2(probed, script_run, capsys):
    path, _ = probed
    at_head, _ = script_run  # num_layers=1: the DNC reads at the head
    capsys.readouterr()
    for argv, needle in [([], "usage"), ([str(path / "absent.pt")], "no such checkpoint"),
                         ([str(next((path / "ckpt").glob("GPT2_Baseline_FINAL_*.pt")))],
                          "not a GPT2 + DNC"),
                         ([str(final_dnc_checkpoint(at_head))], "memory_layer > 0")]:
        assert recall_start_probe.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err

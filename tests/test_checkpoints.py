"""Fault tolerance: checkpoints load back, resume after SIGKILL / SIGTERM, atomic writes,
safe loading of untrusted files, and a NaN loss.

Every run is the same tiny configuration on a short local corpus; one uninterrupted run
(the `reference` fixture) is what the interrupted-and-resumed runs must reproduce.
"""
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dnc_gpt2 as D

MAIN_DIR = Path(D.__file__).resolve().parent
TINY = ["--preset=smoke", "--hidden_size=32", "--num_layers=1", "--num_heads=2", "--mem_slots=8",
        "--mem_width=8", "--num_reads=2", "--seq_len=16", "--batch_size=4", "--max_steps=8",
        "--save_every_steps=3", "--log_every_steps=2", "--inspect_tokens=8"]
CHECKPOINTS = ["GPT2_Baseline_step3.pt", "GPT2_+_DNC_step3.pt",
               "GPT2_Baseline_FINAL_step8.pt", "GPT2_+_DNC_FINAL_step8.pt"]
FINALS = ["GPT2_Baseline_FINAL_step8.pt", "GPT2_+_DNC_FINAL_step8.pt"]
TOL = 1e-5
RUN_TIMEOUT = 300  # seconds; generous, the 2 cores are shared with other suites


# ── fixtures and helpers ────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The generated corpus cut short (valid and test ~1.5k characters): cheap to tokenize and
    to validate, and train still has hundreds of windows for 8 steps of 4."""
    root = tmp_path_factory.mktemp("data")
    sizes = {"train": 40_000, "valid": 1500, "test": 1500}
    for split, text in D.generated_corpus().items():
        text = text[: text.rindex("\n", 0, sizes[split]) + 1]  # whole lines
        (root / f"wiki.{split}.raw").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # Shared by every run: the cache is keyed by content, so only the first run tokenizes.
    return tmp_path_factory.mktemp("cache")


def tiny_args(out, data_dir, cache_dir, *extra):
    """The tiny run's arguments with its checkpoints and plots under `out`."""
    return [*TINY, f"--save_dir={out}/ckpt", f"--plot_dir={out}/plots",
            f"--cache_dir={cache_dir}", f"--data_dir={data_dir}", *extra]


@pytest.fixture
def args_for(data_dir, cache_dir):
    return lambda out, *extra: tiny_args(out, data_dir, cache_dir, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, cache_dir):
    """An uninterrupted run: the folder holding its ckpt/ and plots/."""
    out = tmp_path_factory.mktemp("reference")
    assert D.main(tiny_args(out, data_dir, cache_dir)) == 0
    return out


@pytest.fixture
def spawn():
    """Start `python dnc_gpt2.py ARGS` as a real process; any still running at teardown is killed."""
    started = []

    def start(args, log_path):
        # Output goes to a file, not a pipe: a pipe nobody reads would stall the run when full.
        # One thread, as in this process (conftest.py): the runs stay numerically alike.
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "dnc_gpt2.py", *args], cwd=MAIN_DIR,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_file(proc, path):
    """Poll until `path` exists; fail if the run ends first (then nothing was interrupted)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not path.exists():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} after {RUN_TIMEOUT} s"
        time.sleep(0.01)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_close(a, b, where="history"):
    """Same structure; floats within TOL (absolute or relative), everything else equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=TOL, abs_tol=TOL), (where, a, b)
    else:
        assert a == b, (where, a, b)


def assert_same_weights(path, expected_path):
    ours, theirs = load(path)["model_state_dict"], load(expected_path)["model_state_dict"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=TOL, rtol=0, msg=key)


def assert_same_results(out, reference):
    """history.json (train and val rows of both models) and the FINAL weights match the reference."""
    ours = json.loads((out / "plots" / "history.json").read_text())
    theirs = json.loads((reference / "plots" / "history.json").read_text())
    assert ours["data_source"] == theirs["data_source"]
    assert_close(ours["histories"], theirs["histories"])
    for name in FINALS:
        assert_same_weights(out / "ckpt" / name, reference / "ckpt" / name)


def snapshot(root):
    """Every file under root with the hash of its bytes: to prove nothing was written or changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ── 1. a checkpoint loads back and reproduces its validation loss ──────────────────────────


@pytest.mark.parametrize("filename", CHECKPOINTS)
def test_checkpoint_reproduces_its_validation_loss(reference, data_dir, cache_dir, filename):
    ckpt = load(reference / "ckpt" / filename)
    assert {"model_state_dict", "optimizer_state_dict", "global_step", "epoch", "val_ppl",
            "data_source"} <= ckpt.keys()
    step = int(re.search(r"step(\d+)", filename).group(1))
    texts, source = D.read_local_splits(data_dir)
    assert (ckpt["global_step"], ckpt["data_source"]) == (step, source)
    last_val = ckpt["history"]["val"][-1]
    assert last_val["step"] == step and ckpt["val_ppl"] == last_val["ppl"]

    cfg = D.config_from_args([*TINY, f"--data_dir={data_dir}", f"--cache_dir={cache_dir}"])
    model = D.build_model(cfg, use_dnc="DNC" in filename)
    model.load_state_dict(ckpt["model_state_dict"])
    valid_ids = D.tokenize_cached(D.load_tokenizer(), texts["valid"], cache_dir)
    metrics = D.evaluate(model, D.eval_batches(valid_ids, cfg.seq_len, cfg.batch_size))
    assert abs(metrics["loss"] - last_val["loss"]) <= 1e-6


# ── 2. SIGKILL, then --resume=true, equals an uninterrupted run ─────────────────────────────


@pytest.mark.parametrize("first_checkpoint, killed_model", [
    ("GPT2_Baseline_step3.pt", "GPT2_Baseline"),
    ("GPT2_+_DNC_step3.pt", "GPT2_+_DNC"),
], ids=["during_baseline", "during_dnc"])
def test_resume_after_sigkill_matches_uninterrupted_run(reference, args_for, spawn, tmp_path,
                                                        first_checkpoint, killed_model):
    proc = spawn(args_for(tmp_path), tmp_path / "run.log")
    wait_for_file(proc, tmp_path / "ckpt" / first_checkpoint)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(RUN_TIMEOUT) == -signal.SIGKILL
    # The kill must have landed while that model was still training, or nothing was tested.
    assert not (tmp_path / "ckpt" / f"{killed_model}_FINAL_step8.pt").exists()

    assert D.main(args_for(tmp_path, "--resume=true")) == 0
    assert_same_results(tmp_path, reference)


# ── 3. SIGTERM saves the current step, says how to resume, and resuming finishes the run ──


def test_sigterm_saves_current_step_and_resume_finishes(reference, args_for, spawn, tmp_path):
    proc = spawn(args_for(tmp_path), tmp_path / "run.log")
    wait_for_file(proc, tmp_path / "ckpt" / "GPT2_Baseline_step3.pt")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(RUN_TIMEOUT) == 128 + signal.SIGTERM
    log = (tmp_path / "run.log").read_text()

    interrupted = re.search(r"interrupted: .*at step (\d+) of (.+?): saved (\S+)", log)
    assert interrupted, log[-2000:]
    step, name, saved = int(interrupted.group(1)), interrupted.group(2), Path(interrupted.group(3))
    ckpt = load(saved)
    assert saved.parent == tmp_path / "ckpt" and step >= 3
    assert (ckpt["global_step"], ckpt["model_name"]) == (step, name)

    resume = re.search(r"^resume with: (.+)$", log, re.MULTILINE)
    assert resume, log[-2000:]
    command = shlex.split(resume.group(1))
    assert command[:2] == ["python", "dnc_gpt2.py"] and "--resume=true" in command
    assert D.main(command[2:]) == 0
    assert_same_results(tmp_path, reference)


# ── 4. atomic writes: a failure mid-write leaves the earlier file and no temp file ──────────


def test_atomic_write_failure_keeps_earlier_content(tmp_path):
    target = tmp_path / "GPT2_Baseline_step3.pt"
    target.write_bytes(b"earlier checkpoint")

    def half_then_fail(tmp):
        tmp.write_bytes(b"half of a new ch")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        D.atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"earlier checkpoint"
    assert os.listdir(tmp_path) == [target.name]


def test_save_checkpoint_torn_by_torch_save_failure(tmp_path, monkeypatch):
    cfg = D.Config(hidden_size=8, num_layers=1, num_heads=2, vocab_size=11, mem_slots=4,
                   mem_width=4, num_reads=1, save_dir=str(tmp_path))
    model = D.build_model(cfg, use_dnc=True)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    history = {"train": [], "val": [{"step": 3, "loss": 2.0, "ppl": math.exp(2.0)}]}

    def save(step):
        return D.save_checkpoint(cfg, "GPT2 + DNC", model, optimizer, scaler, step, 100,
                                 history, D.TrainLog(), "test data", torch.device("cpu"), None)

    earlier = save(3)
    before = earlier.read_bytes()
    real_save = torch.save

    def torn_save(obj, f):
        real_save(obj, f)  # a complete file first, then cut short: what a crash mid-write leaves
        Path(f).write_bytes(Path(f).read_bytes()[:1000])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    for step in (3, 6):  # over an earlier file, and to a new name
        with pytest.raises(OSError, match="disk full"):
            save(step)
    assert earlier.read_bytes() == before
    assert os.listdir(tmp_path) == [earlier.name]


# ── 5. untrusted or mismatched checkpoints: exit 2, one line naming the file, nothing touched ─


class ShellPayload:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def malicious_pickle(path, reference, marker):
    torch.save({"model_state_dict": ShellPayload(marker), "global_step": 3}, path)


def truncated_checkpoint(path, reference, marker):
    whole = (reference / "ckpt" / "GPT2_Baseline_step3.pt").read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


def text_file(path, reference, marker):
    path.write_text("not a checkpoint\n")


def missing_fields(path, reference, marker):
    torch.save({"global_step": 3}, path)


def other_config(path, reference, marker):
    shutil.copy(reference / "ckpt" / "GPT2_Baseline_step3.pt", path)


def removed_option(path, reference, marker):
    ckpt = load(reference / "ckpt" / "GPT2_Baseline_FINAL_step8.pt")
    ckpt["config"]["lambda_write"] = 0.1  # an option of the code before the cleanup
    torch.save(ckpt, path)


def baseline_step6_and_text_file(path, reference, marker):
    # The baseline resumes from step 6 (two steps left, cheap) before the DNC's file is read.
    shutil.copy(reference / "ckpt" / "GPT2_Baseline_step6.pt", path.parent)
    text_file(path, reference, marker)


@pytest.mark.parametrize("filename, make, extra, named", [
    ("GPT2_Baseline_step3.pt", malicious_pickle, [], "not a loadable checkpoint"),
    ("GPT2_Baseline_step3.pt", truncated_checkpoint, [], "not a loadable checkpoint"),
    ("GPT2_Baseline_step3.pt", text_file, [], "not a loadable checkpoint"),
    ("GPT2_Baseline_step3.pt", missing_fields, [], "missing fields"),
    ("GPT2_Baseline_step3.pt", other_config, ["--mem_slots=16"], "mem_slots"),
    ("GPT2_Baseline_FINAL_step8.pt", removed_option, [],
     "made with --lambda_write=0.1, options since removed; run it with the code of git tag "
     "options-before-cleanup"),
    ("GPT2_Baseline_FINAL_step8.pt", removed_option, ["--eval_only=true"],
     "options-before-cleanup"),
    # a bad DNC checkpoint must stop the run before the baseline trains on
    ("GPT2_+_DNC_step3.pt", baseline_step6_and_text_file, [], "not a loadable checkpoint"),
], ids=["malicious_pickle", "truncated", "text_file", "missing_fields", "other_config",
        "removed_option", "removed_option_eval_only", "bad_dnc_checkpoint"])
def test_bad_checkpoint_is_refused_untouched(reference, args_for, tmp_path, capsys, filename,
                                             make, extra, named):
    (tmp_path / "ckpt").mkdir()
    bad, marker = tmp_path / "ckpt" / filename, tmp_path / "pwned"
    make(bad, reference, marker)
    before = snapshot(tmp_path)

    status = D.main(args_for(tmp_path, *extra, "--resume=true"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert str(bad) in errors[0] and named in errors[0], errors[0]
    assert snapshot(tmp_path) == before


def test_malicious_payload_is_live(tmp_path):
    # Without this, a payload that never worked would make the refusal test above vacuous.
    path, marker = tmp_path / "GPT2_Baseline_step3.pt", tmp_path / "pwned"
    malicious_pickle(path, None, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


# ── 6. a NaN loss stops the run; no checkpoint holds a NaN, the last good one stays ─────────


def poison_loss(monkeypatch, at_call):
    """compute_loss returns NaN (still differentiable) on its at_call-th call."""
    real_compute_loss, calls = D.compute_loss, []

    def poisoned(out, targets, cfg, use_dnc, answer_targets=None):
        loss, parts = real_compute_loss(out, targets, cfg, use_dnc, answer_targets)
        calls.append(1)
        return (loss * math.nan if len(calls) == at_call else loss), parts

    monkeypatch.setattr(D, "compute_loss", poisoned)


def finite_everywhere(obj):
    """True when no float tensor or float inside obj (nested dicts, lists, tuples) is NaN / inf."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(finite_everywhere(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(finite_everywhere(v) for v in obj)
    return True


@pytest.mark.parametrize("poisoned_call, name, step, saved", [
    (5, "GPT2 Baseline", 5, ["GPT2_Baseline_step3.pt"]),
    # compute_loss runs once per training step (no grad accumulation): the baseline's 8,
    # then the DNC's
    (8 + 4, "GPT2 + DNC", 4, ["GPT2_Baseline_step3.pt", "GPT2_Baseline_step6.pt",
                              "GPT2_Baseline_FINAL_step8.pt", "GPT2_+_DNC_step3.pt"]),
], ids=["baseline", "dnc"])
def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(reference, args_for, tmp_path, capsys,
                                                           monkeypatch, poisoned_call, name,
                                                           step, saved):
    poison_loss(monkeypatch, poisoned_call)
    assert D.main(args_for(tmp_path)) == 1
    errors = re.findall(r"^error: [^\r\n]*", capsys.readouterr().err, re.MULTILINE)
    assert len(errors) == 1 and re.search(rf"{re.escape(name)}: .*\bnan at step {step}\b",
                                          errors[0]), errors

    ckpt_dir = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(saved)
    for path in ckpt_dir.iterdir():
        assert finite_everywhere(load(path)), path.name
    assert_same_weights(ckpt_dir / saved[-1], reference / "ckpt" / saved[-1])


def test_kept_checkpoints_resume_from_the_newest_and_finish_as_the_uninterrupted_run(
        reference, args_for, tmp_path, capsys, monkeypatch):
    """keep_checkpoints=2 with a save every 2 steps: after each save only the newest two
    periodic checkpoints of that model remain, and its FINAL one. A run stopped by a NaN at
    the DNC's step 5 resumes from its newest (step 4) and ends with the reference's weights and
    train rows (validation comes every 2 steps here, every 3 there)."""
    keep = ["--save_every_steps=2", "--keep_checkpoints=2"]
    poison_loss(monkeypatch, 8 + 5)
    assert D.main(args_for(tmp_path, *keep)) == 1
    ckpt_dir = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted([
        "GPT2_Baseline_step4.pt", "GPT2_Baseline_step6.pt", "GPT2_Baseline_FINAL_step8.pt",
        "GPT2_+_DNC_step2.pt", "GPT2_+_DNC_step4.pt"])
    capsys.readouterr()
    assert D.main(args_for(tmp_path, *keep, "--resume=true")) == 0
    assert (f"GPT2 + DNC: resumed from {ckpt_dir / 'GPT2_+_DNC_step4.pt'} at step 4"
            in capsys.readouterr().out)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted([
        "GPT2_Baseline_step4.pt", "GPT2_Baseline_step6.pt", "GPT2_Baseline_FINAL_step8.pt",
        "GPT2_+_DNC_step4.pt", "GPT2_+_DNC_step6.pt", "GPT2_+_DNC_FINAL_step8.pt"])
    ours = json.loads((tmp_path / "plots" / "history.json").read_text())["histories"]
    theirs = json.loads((reference / "plots" / "history.json").read_text())["histories"]
    for name in D.MODEL_NAMES:
        assert_close(ours[name]["train"], theirs[name]["train"], name)
    for name in FINALS:
        assert_same_weights(ckpt_dir / name, reference / "ckpt" / name)


@pytest.mark.parametrize("keep", [2, 0])
def test_keep_checkpoints_deletes_older_periodic_checkpoints_of_that_model_only(tmp_path, keep):
    """Periodic saves at steps 2 to 8 with a FINAL one at 5 between them (a finished run
    resumed for more steps): K keeps the newest K periodic ones, every FINAL one and the
    other model's; 0 keeps every one."""
    cfg = D.Config(hidden_size=8, num_layers=1, num_heads=2, vocab_size=11, mem_slots=4,
                   mem_width=4, num_reads=1, save_dir=str(tmp_path), keep_checkpoints=keep)
    model = D.build_model(cfg, use_dnc=False)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    history = {"train": [], "val": []}
    for name, step, final in [("GPT2 Baseline", 2, False), ("GPT2 + DNC", 2, False),
                              ("GPT2 + DNC", 4, False), ("GPT2 + DNC", 5, True),
                              ("GPT2 + DNC", 6, False), ("GPT2 + DNC", 8, False)]:
        D.save_checkpoint(cfg, name, model, optimizer, scaler, step, 100, history, D.TrainLog(),
                          "test data", torch.device("cpu"), None, final)
    dnc = ["GPT2_+_DNC_step2.pt", "GPT2_+_DNC_step4.pt", "GPT2_+_DNC_FINAL_step5.pt",
           "GPT2_+_DNC_step6.pt", "GPT2_+_DNC_step8.pt"]
    kept = dnc if keep == 0 else dnc[2:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["GPT2_Baseline_step2.pt", *kept])


def test_training_error_starts_its_own_line(args_for, tmp_path, capsys, monkeypatch):
    poison_loss(monkeypatch, 1)
    assert D.main(args_for(tmp_path)) == 1
    assert any(line.startswith("error:") for line in capsys.readouterr().err.splitlines())


def saved_config(path, config):
    """A checkpoint file that holds `config` (a dict, as saved) and nothing else of use."""
    torch.save({"model_state_dict": {}, "optimizer_state_dict": {}, "global_step": 1,
                "config": config, "history": {}}, path)
    return path


def test_a_checkpoint_older_than_a_field_resumes_at_that_fields_default(tmp_path):
    cfg = D.Config()
    older = dataclasses.asdict(cfg)
    del older["interface_context"]  # made before the field existed
    path = saved_config(tmp_path / "GPT2_Baseline_step1.pt", older)
    assert D.load_checkpoint(path, cfg, None)["global_step"] == 1
    with pytest.raises(D.ConfigError, match="made with interface_context=1, this run has "
                                            "interface_context=3"):
        D.load_checkpoint(path, dataclasses.replace(cfg, interface_context=3), None)


# the code before the cleanup: the removed options and the three steps binding_from replaced
BEFORE_CLEANUP = {**{name: default for name, (default, code) in D.REMOVED_OPTIONS.items()
                     if code == D.CLEANUP}, "recall_facts_from": 0, "recall_shift_from": 0,
                  "interface_context_from": 0}
RECALL = dict(dataset="recall", recall_facts=2, recall_shift=True, interface_context=10)


def before_cleanup(cfg, **old):
    """cfg as the code of the tag saved it: no binding_from, its own options at `old`."""
    made = {**dataclasses.asdict(cfg), **BEFORE_CLEANUP, **old}
    del made["binding_from"]
    return made


@pytest.mark.parametrize("recall, steps", [
    (RECALL, dict(recall_facts_from=1501, recall_shift_from=1501, interface_context_from=1501)),
    # the preset before Y1: an interface of one token, its step at 0 (Results: Y1)
    ({**RECALL, "interface_context": 1}, dict(recall_facts_from=1501, recall_shift_from=1501)),
    # a step whose feature is off never mattered: one fact needs no binding, nor is shifted
    ({**RECALL, "recall_facts": 1, "recall_shift": False},
     dict(recall_facts_from=7, recall_shift_from=0, interface_context_from=1501)),
], ids=["recall_preset", "one_token_interface", "features_off"])
def test_a_checkpoint_whose_binding_steps_agree_loads_as_binding_from(tmp_path, recall, steps):
    cfg = D.Config(**recall, binding_from=1501)
    path = saved_config(tmp_path / "GPT2_+_DNC_step1.pt", before_cleanup(cfg, **steps))
    assert D.load_checkpoint(path, cfg, None)["global_step"] == 1
    with pytest.raises(D.ConfigError, match="made with binding_from=1501, this run has "
                                            "binding_from=0"):
        D.load_checkpoint(path, dataclasses.replace(cfg, binding_from=0), None)


@pytest.mark.parametrize("old", [
    dict(lambda_write=0.1), dict(routing_stride=4), dict(query_opens_segment=True),
    dict(recall_facts_from=1501, recall_shift_from=1000, interface_context_from=1501)])
def test_a_checkpoint_of_a_removed_option_is_refused_naming_the_tag(tmp_path, old):
    cfg = D.Config(**RECALL)
    path = saved_config(tmp_path / "GPT2_+_DNC_step1.pt", before_cleanup(cfg, **old))
    with pytest.raises(D.ConfigError) as error:
        D.load_checkpoint(path, cfg, None)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and str(path) in message
    assert "git tag options-before-cleanup (commit 06b7456)" in message
    assert "memory-grad" not in message
    for name, value in old.items():
        assert f"--{name}={value}" in message


@pytest.mark.parametrize("name, value, default, code", [
    ("memory_grad", "answers", "all", "git tag memory-grad (commit 3cb4fc7)"),
    ("warmup_steps", 250, 0, "git tag warmup-steps (commit 81bdb27)"),
    ("memory_banks", 2, 1, "git tag memory-banks (commit f8e99a3)"),
    ("write_gate_grad", 0.0, 1.0, "git tag write-gate-grad (commit c5c0f2d)"),
    ("interface_grad", "keys", "all", "git tag interface-grad (commit c801b3b)"),
    ("forced_write_rate", 0.1, 0.0, "git tag forced-write-rate (commit 69f98b5)"),
    ("zero_residual_init", True, False, "git tag zero-residual-init (commit 72e99e0)"),
    ("one_fact_batch_size", 64, 0, "git tag one-fact-batch-size (commit 44f0cb1)")])
def test_a_checkpoint_of_an_option_removed_later_is_refused_naming_its_own_tag(
        tmp_path, name, value, default, code):
    cfg = D.Config(**RECALL)
    made = {**dataclasses.asdict(cfg), name: value}
    path = saved_config(tmp_path / "GPT2_+_DNC_step1.pt", made)
    with pytest.raises(D.ConfigError) as error:
        D.load_checkpoint(path, cfg, None)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and f"--{name}={value}" in message
    assert code in message
    assert "options-before-cleanup" not in message
    # at its default it was the code of today
    path = saved_config(tmp_path / "GPT2_+_DNC_step2.pt", {**made, name: default})
    assert D.load_checkpoint(path, cfg, None)["global_step"] == 1


def test_a_checkpoint_made_before_the_removed_options_existed_still_loads(tmp_path):
    cfg = D.Config()
    older = {k: v for k, v in dataclasses.asdict(cfg).items()
             if k not in ("binding_from", "keep_checkpoints")}
    assert not set(older) & set(BEFORE_CLEANUP)
    path = saved_config(tmp_path / "GPT2_Baseline_step1.pt", older)
    assert D.load_checkpoint(path, cfg, None)["global_step"] == 1


def test_every_field_that_differs_is_named_in_the_one_error(tmp_path):
    """A preset that changed two values (as the recall preset's schedule did) needs one retry."""
    cfg = D.Config()
    path = tmp_path / "GPT2_Baseline_step1.pt"
    torch.save({"model_state_dict": {}, "optimizer_state_dict": {}, "global_step": 1,
                "config": dataclasses.asdict(cfg), "history": {}}, path)
    with pytest.raises(D.ConfigError) as error:
        D.load_checkpoint(path, dataclasses.replace(cfg, lr_decay_from=5, min_lr=1e-5), None)
    assert "pass --lr_decay_from=0 --min_lr=0.0 or" in str(error.value)
    assert "this run has lr_decay_from=5, min_lr=1e-05" in str(error.value)

"""Config parsing and validation: bad input gets one clear line naming the field, exit status 2,
and never touches files of an earlier run."""
import dataclasses
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dnc_gpt2

SCRIPT = Path(dnc_gpt2.__file__)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without GPUs")


# ── config_from_args ─────────────────────────────────────────────────────────────────────


def test_values_are_parsed_by_field_type():
    cfg = dnc_gpt2.config_from_args(["--batch_size=7", "--lr=0.001", "--device=cpu",
                                     "--temporal_links=true", "--resume=1"])
    assert (cfg.batch_size, cfg.lr, cfg.device) == (7, 0.001, "cpu")
    assert type(cfg.batch_size) is int and type(cfg.lr) is float
    assert cfg.temporal_links is True and cfg.resume is True
    cfg = dnc_gpt2.config_from_args(["--temporal_links=false", "--resume=0"])
    assert cfg.temporal_links is False and cfg.resume is False


@pytest.mark.parametrize("args", [["--preset=smoke", "--hidden_size=32"],
                                  ["--hidden_size=32", "--preset=smoke"]])
def test_explicit_overrides_beat_the_preset_in_any_order(args):
    cfg = dnc_gpt2.config_from_args(args)
    assert cfg.hidden_size == 32
    assert cfg.num_layers == dnc_gpt2.PRESETS["smoke"]["num_layers"] != dnc_gpt2.Config.num_layers


def test_presets_apply_in_the_order_listed_and_overrides_beat_them_all():
    """--preset=cpu,lookup: the cpu sizes with the lookup preset's DNC settings; where two
    presets set a field the later one wins, and an explicit flag beats both."""
    cfg = dnc_gpt2.config_from_args(["--preset=cpu,lookup"])
    for name, value in {**dnc_gpt2.PRESETS["cpu"], **dnc_gpt2.LOOKUP}.items():
        assert getattr(cfg, name) == value, name
    assert dnc_gpt2.PRESETS["lookup"] is dnc_gpt2.LOOKUP
    swapped = dnc_gpt2.config_from_args(["--preset=lookup,cpu"])  # no field in common
    assert dataclasses.replace(swapped, preset=cfg.preset) == cfg
    both = set(dnc_gpt2.PRESETS["smoke"]) & set(dnc_gpt2.PRESETS["cpu"])
    assert "hidden_size" in both
    for order in (["smoke", "cpu"], ["cpu", "smoke"]):
        cfg = dnc_gpt2.config_from_args([f"--preset={','.join(order)}"])
        assert {name: getattr(cfg, name) for name in both} == \
            {name: dnc_gpt2.PRESETS[order[-1]][name] for name in both}
    cfg = dnc_gpt2.config_from_args(["--preset=cpu,lookup", "--memory_layer=2"])
    assert (cfg.memory_layer, cfg.hidden_size) == (2, dnc_gpt2.PRESETS["cpu"]["hidden_size"])


def test_the_recall_preset_is_the_lookup_preset_with_its_task():
    recall = dnc_gpt2.PRESETS["recall"]
    assert {name: recall[name] for name in dnc_gpt2.LOOKUP} == dnc_gpt2.LOOKUP
    assert recall["binding_from"] == 1501
    assert recall["answer_readout"] == 1.0 and dnc_gpt2.Config().answer_readout == 0.0


@pytest.mark.parametrize("arg, field", [
    ("--bogus_field=1", "bogus_field"),
    ("--batch_size=abc", "batch_size"),
    ("--lr=fast", "lr"),
    ("--temporal_links=maybe", "temporal_links"),
    ("--batch_size", "batch_size"),  # no '='
])
def test_bad_arguments_raise_config_error_naming_the_field(arg, field):
    with pytest.raises(dnc_gpt2.ConfigError, match=field):
        dnc_gpt2.config_from_args([arg])


# ── main(): bad input ────────────────────────────────────────────────────────────────────

EARLIER_FILES = {"ckpt/GPT2_Baseline_step5.pt": b"earlier checkpoint bytes",
                 "plots/training_curves.png": b"\x89PNG earlier plot bytes"}
SMALL_TEXT = " = Tiny = \n A tiny split with only a few tokens in it . \n"


@pytest.fixture(scope="module")
def tokenizer():
    return dnc_gpt2.load_tokenizer()


@pytest.fixture
def workspace(tmp_path, tokenizer, monkeypatch):
    """tmp_path holding an earlier run's files, a regular file to block paths, and data dirs."""
    monkeypatch.setattr(dnc_gpt2, "load_tokenizer", lambda: tokenizer)  # seconds per load
    monkeypatch.setattr(dnc_gpt2, "read_hf_splits", lambda: None)  # no network in these tests

    def no_training(*args):  # input that slips through must fail here, not train for minutes
        raise AssertionError("bad input reached training")

    monkeypatch.setattr(dnc_gpt2, "train_model", no_training)
    for name, data in EARLIER_FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    (tmp_path / "a_file").write_text("not a directory")
    for folder, texts in (("empty_split", {"train": SMALL_TEXT, "valid": "", "test": SMALL_TEXT}),
                          ("tiny", dict.fromkeys(dnc_gpt2.SPLITS, SMALL_TEXT * 4))):
        (tmp_path / folder).mkdir()
        for split, text in texts.items():
            (tmp_path / folder / f"wiki.{split}.raw").write_text(text)
    return tmp_path


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    # main() installs SIGINT/SIGTERM handlers once input is valid and leaves them behind
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def snapshot(root):
    """Every path under root with its bytes (None for folders), the token cache left out."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in root.rglob("*") if "cache" not in p.relative_to(root).parts}


def run_main(root, args):
    paths = [f"--save_dir={root}/ckpt", f"--plot_dir={root}/plots", f"--cache_dir={root}/cache"]
    return dnc_gpt2.main(paths + [a.format(tmp=root) for a in args])


@pytest.mark.parametrize("args, field", [
    (["--hidden_size=0"], "hidden_size"),
    (["--batch_size=0"], "batch_size"),
    (["--seq_len=-1"], "seq_len"),
    (["--mem_slots=0"], "mem_slots"),
    (["--num_reads=0"], "num_reads"),
    (["--hidden_size=64", "--num_heads=5"], "num_heads"),
    (["--seq_len=2048"], "seq_len"),
    (["--lr=0"], "lr"),
    (["--lr=-1"], "lr"),
    (["--lr_decay_from=-1"], "lr_decay_from"),
    (["--min_lr=3e-4"], "min_lr"),
    (["--lambda_routing=-0.1"], "lambda_routing"),
    (["--lambda_entropy=-1"], "lambda_entropy"),
    (["--allocation_gate_bias=nan"], "allocation_gate_bias"),
    (["--save_every_steps=0"], "save_every_steps"),
    (["--log_every_steps=0"], "log_every_steps"),
    (["--dropout=1.5"], "dropout"),
    (["--num_gpus=3"], "num_gpus"),
    pytest.param(["--num_gpus=1"], "num_gpus", marks=NO_CUDA),
    pytest.param(["--device=cuda"], "device", marks=NO_CUDA),
    (["--preset=bogus"], "preset"),
    (["--preset=cpu,bogus"], "preset"),
    (["--keep_checkpoints=-1"], "keep_checkpoints"),
    # root runs these tests and ignores chmod: a path under a regular file is unwritable for all
    (["--save_dir={tmp}/a_file/ckpt"], "save_dir"),
    (["--plot_dir={tmp}/a_file/plots"], "plot_dir"),
    (["--data_dir={tmp}/no_such_dir"], "data_dir"),
    # os.access says yes to root here; only creating a file shows that /proc takes none
    (["--save_dir=/proc/nope", "--resume=true"], "save_dir"),
    (["--cache_dir=/proc/nope", "--resume=true"], "cache_dir"),
    (["--epochs=-1", "--max_steps=3"], "epochs"),
    (["--epochs=0"], "epochs"),
    (["--temperature=-1"], "temperature"),
    (["--top_k=-1"], "top_k"),
    (["--max_new_tokens=0"], "max_new_tokens"),
    (["--memory_layer=9"], "memory_layer"),
    (["--interface_context=0"], "interface_context"),
    (["--seq_len=16", "--interface_context=17"], "interface_context"),
    (["--interface_context=3", "--binding_from=-1"], "binding_from"),
    (["--binding_from=1501"], "binding_from"),  # WikiText with interface_context=1: no effect
    (["--preset=recall", "--answer_readout=-1"], "answer_readout"),
    (["--answer_readout=1"], "answer_readout"),  # WikiText: no answers to read out
    # the data checks come after the refusal to overwrite, so these pass --resume to reach them
    (["--data_dir={tmp}/empty_split", "--resume=true"], "data_dir"),
    (["--data_dir={tmp}/tiny", "--batch_size=64", "--seq_len=16", "--resume=true"], "batch_size"),
])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(workspace, capsys, args, field):
    before = snapshot(workspace)
    assert run_main(workspace, args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and f"--{field}" in err and "Traceback" not in err
    assert snapshot(workspace) == before  # earlier files byte for byte, and nothing new


@pytest.mark.parametrize("earlier", list(EARLIER_FILES))
def test_rerun_without_resume_refuses_and_keeps_earlier_files(workspace, capsys, earlier):
    for name in EARLIER_FILES:
        if name != earlier:
            (workspace / name).unlink()
    before = snapshot(workspace)
    # valid config; its data dir has an empty split, so a missing refusal fails without --resume
    assert run_main(workspace, ["--data_dir={tmp}/empty_split"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "--resume" in err, err
    assert snapshot(workspace) == before


def test_script_exits_2_with_one_line_on_bad_input(tmp_path):
    # cwd=tmp_path: the default relative save/plot/cache dirs could only land there
    done = subprocess.run([sys.executable, str(SCRIPT), "--hidden_size=0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "hidden_size" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_field_with_type_default_and_meaning(flag, capsys):
    assert dnc_gpt2.main([flag]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(dnc_gpt2.Config):
        assert f"--{f.name}={dnc_gpt2.default_text(f.default)}  ({f.type.__name__})" in out
        assert dnc_gpt2.FIELD_HELP[f.name] in out
    assert all(f"  {name}: " in out for name in dnc_gpt2.PRESETS) and "--preset=smoke" in out


def test_readme_config_table_is_the_one_help_prints():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert dnc_gpt2.config_table() in readme
    assert set(dnc_gpt2.FIELD_HELP) == {f.name for f in dataclasses.fields(dnc_gpt2.Config)}


def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to -."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_readme_links_into_the_log_name_headings_it_has():
    root = Path(__file__).resolve().parent.parent
    log = (root / "experiments" / "LOG.md").read_text().splitlines()
    anchors = {github_anchor(line) for line in log if line.startswith("#")}
    for document in ("README.md", "experiments/LOG.md"):
        links = re.findall(r"\(((?:experiments/)?LOG\.md)?#([\w\-]+)\)",
                           (root / document).read_text())
        targets = [anchor for path, anchor in links if path or document.endswith("LOG.md")]
        assert targets, document
        missing = [anchor for anchor in targets if anchor not in anchors]
        assert not missing, f"{document} links to headings that experiments/LOG.md lacks: {missing}"

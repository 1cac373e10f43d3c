"""Data and tokenizer: GPT-2's exact BPE, windows that predict every token once, data sources, cache."""
from pathlib import Path

import pytest
import torch

import dnc_gpt2

WT2_MINI_VALID = Path("/work/shared/data/wt2-mini/wiki.valid.tokens")


@pytest.fixture(scope="module")
def tokenizer():
    return dnc_gpt2.load_tokenizer()  # several seconds: load once per module


# ── tokenizer ────────────────────────────────────────────────────────────────────────────


def test_tokenizer_is_gpt2s_bpe(tokenizer):
    assert len(tokenizer) == 50257
    assert tokenizer.encode("Hello world") == [15496, 995]


def test_tokenizer_round_trips_real_text(tokenizer):
    # real WikiText when the shared copy exists; the generated corpus keeps the test meaningful
    # (and passing) on a machine without it
    if WT2_MINI_VALID.is_file():
        text = WT2_MINI_VALID.read_text(encoding="utf-8")[:20_000]
    else:
        text = dnc_gpt2.generated_corpus()["valid"]
    ids = tokenizer.encode(text)
    assert len(ids) > 1000
    assert tokenizer.decode(ids) == text


# ── windows ──────────────────────────────────────────────────────────────────────────────

SEQ_LEN, BATCH = 8, 3
# (len - 1) % SEQ_LEN == 0: 9, 17, 57; otherwise: 10, 58, 100; shorter than a window: 2, 5, 8
LENGTHS = [2, 5, 8, 9, 10, 17, 57, 58, 100]


def random_stream(length):
    return torch.randint(0, 50257, (length,), generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("length", LENGTHS)
def test_eval_batches_predict_every_token_exactly_once(length):
    ids = random_stream(length)
    batches = list(dnc_gpt2.eval_batches(ids, SEQ_LEN, BATCH))
    targets = torch.cat([b[:, 1:].reshape(-1) for b in batches])
    assert torch.equal(targets, ids[1:].long())
    # walk the stream: each row is the very slice of ids that it claims (inputs precede their
    # targets, nothing padded in), and the next row starts at this row's last token
    start = 0
    for batch in batches:
        assert batch.shape[1] <= SEQ_LEN + 1
        for row in batch:
            assert torch.equal(row, ids[start:start + len(row)].long())
            start += len(row) - 1
    assert start == length - 1


@pytest.mark.parametrize("length", LENGTHS)
def test_make_windows_shapes(length):
    windows, tail = dnc_gpt2.make_windows(random_stream(length), SEQ_LEN)
    full, rest = divmod(length - 1, SEQ_LEN)
    assert windows.shape == (full, SEQ_LEN + 1)
    if rest:
        assert tail.shape == (1, rest + 1)
    else:
        assert tail is None


@pytest.mark.parametrize("length", LENGTHS)
def test_eval_batches_are_never_empty(length):
    # evaluate() feeds every batch to the model, and GPT-2 cannot run on a (0, T) input
    rows = [len(b) for b in dnc_gpt2.eval_batches(random_stream(length), SEQ_LEN, BATCH)]
    assert 0 not in rows


def test_epoch_order_is_a_deterministic_permutation_per_epoch():
    order = dnc_gpt2.epoch_order(100, seed=7, epoch=0)
    assert torch.equal(order.sort().values, torch.arange(100))
    assert torch.equal(order, dnc_gpt2.epoch_order(100, seed=7, epoch=0))
    assert not torch.equal(order, dnc_gpt2.epoch_order(100, seed=7, epoch=1))
    assert not torch.equal(order, dnc_gpt2.epoch_order(100, seed=8, epoch=0))


# ── data sources ─────────────────────────────────────────────────────────────────────────

TEXTS = {"train": " = Train = \n \n Some café text , 1 @,@ 000 . \n",
         "valid": " = Valid = \n\n Valid line one . \n Line two . \n",
         "test": " = Test = \n A test line without trailing newline"}


def write_splits(folder, ext, texts=TEXTS):
    folder.mkdir(exist_ok=True)
    for split, text in texts.items():
        (folder / f"wiki.{split}.{ext}").write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("ext", ["raw", "tokens"])
def test_read_local_splits_returns_texts_unchanged(tmp_path, ext):
    texts, source = dnc_gpt2.read_local_splits(write_splits(tmp_path, ext))
    assert texts == TEXTS
    assert str(tmp_path.resolve()) in source


def test_read_local_splits_missing_split_names_it(tmp_path):
    write_splits(tmp_path, "raw")
    (tmp_path / "wiki.test.raw").unlink()
    with pytest.raises(dnc_gpt2.ConfigError, match=r"wiki\.test"):
        dnc_gpt2.read_local_splits(tmp_path)


def test_read_local_splits_empty_split_names_it(tmp_path):
    write_splits(tmp_path, "tokens", {**TEXTS, "valid": ""})
    with pytest.raises(dnc_gpt2.ConfigError, match=r"wiki\.valid\.tokens"):
        dnc_gpt2.read_local_splits(tmp_path)


def test_load_data_tokenizes_once_then_reads_the_cache(tmp_path, tokenizer, monkeypatch):
    cfg = dnc_gpt2.Config(data_dir=str(write_splits(tmp_path / "data", "raw")),
                          cache_dir=str(tmp_path / "cache"))
    calls = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text: calls.append(text) or encode(text))
    first, source = dnc_gpt2.load_data(cfg, tokenizer)
    assert len(calls) == 3

    def no_bpe(text):
        raise AssertionError("re-tokenized a cached split")

    monkeypatch.setattr(tokenizer, "encode", no_bpe)
    second, _ = dnc_gpt2.load_data(cfg, tokenizer)
    assert all(torch.equal(first[s], second[s]) for s in dnc_gpt2.SPLITS)
    assert torch.equal(first["train"].long(), torch.tensor(encode(TEXTS["train"])))

    # the key is the content: an edited split is tokenized afresh, the others still come cached
    monkeypatch.setattr(tokenizer, "encode", lambda text: calls.append(text) or encode(text))
    (tmp_path / "data" / "wiki.valid.raw").write_text(TEXTS["valid"] + " More . \n")
    third, _ = dnc_gpt2.load_data(cfg, tokenizer)
    assert len(calls) == 4 and calls[-1].endswith(" More . \n")
    assert len(third["valid"]) > len(first["valid"])
    assert len(list((tmp_path / "cache").iterdir())) == 4


def test_generated_corpus_is_deterministic_and_non_empty():
    corpus = dnc_gpt2.generated_corpus()
    assert corpus == dnc_gpt2.generated_corpus()
    assert set(corpus) == set(dnc_gpt2.SPLITS)
    assert all(len(corpus[split]) > 1000 for split in dnc_gpt2.SPLITS)


def test_load_texts_falls_back_to_generated_corpus_with_banner(monkeypatch, capsys):
    monkeypatch.setattr(dnc_gpt2, "read_hf_splits", lambda: None)  # no network, no HF cache
    texts, source = dnc_gpt2.load_texts(dnc_gpt2.Config(data_dir=""))
    assert texts == dnc_gpt2.generated_corpus()
    assert "generated" in source.lower()
    assert "GENERATED" in capsys.readouterr().out

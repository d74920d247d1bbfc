"""Importance for a language model: a "class" is a target next token (or a set of them).

For a language model the paper's class c becomes a target: one token (a
newline, ``:``) or a set of them (every capital letter), studied at the
positions where it is the true next token. Eq 5's class logit becomes the
log-probability the model gives the true next token there, and the reversion
evaluation (Table 1) measures whether the model still ranks it first (top-1),
among its first five (top-5), and its log-loss.

The image machinery runs unchanged on two pieces:

* :class:`TargetOccurrences`: a dataset with one item per *occurrence*: a
  window of the text and a position ``p`` in it whose true next token (the
  stream's token after position ``p``, which may lie just past the window's
  end) is in the target set. Its items are ``(x, 0, i)``, ``x`` the window's
  tokens followed by ``p`` and the true next token (int64 ``[context + 2]``),
  label 0 (the one class), ``i`` the occurrence's number.
* :func:`next_token_outputs`: within a ``with`` block, a language model fed
  such an ``x`` returns ``[rows, vocab]`` log-probabilities at position ``p``
  with the true next token's column swapped into column 0. So "class 0's
  logit" is the log-probability of the true next token (Eq 5 takes its
  gradient), a top-1 hit means the true token is the argmax, and a log-loss is
  its negative log-probability. It works by hooks on the model's own root
  module (a pre-hook strips the two extra columns, a forward hook picks
  position ``p``), so every layer keeps its name; the reversion engine's forked
  batches (``copies x batch`` rows) are matched by tiling.

:func:`parse_target` reads a target from the command line:

* a token's text with escapes: ``\\n`` (newline), ``\\t`` (tab), ``\\\\``
  (backslash), ``\\|`` and ``\\,`` (a literal bar or comma);
* a name: ``newline``, ``space``, ``tab``, ``comma``, ``pipe``, or a class of
  the vocabulary: ``upper`` (tokens whose whole text is upper-case letters,
  e.g. the capitals of speaker names), ``lower``, ``letter``, ``digit``,
  ``punct`` (every character a Unicode punctuation mark); a leading ``=``
  takes the rest literally (``=space`` is the text "space");
* several of these joined by ``|``: a set, e.g. ``"A|B|C"`` or ``".|!|?"``.

Each alternative must be one token of the study's tokenizer.
"""
from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConceptEvoError, DatasetError

log = logging.getLogger(__name__)

#: Target names for single characters that are awkward to type.
NAMED = {"newline": "\n", "space": " ", "tab": "\t", "comma": ",", "pipe": "|"}
#: Target names for sets of tokens: the test a token's whole text must pass.
CLASSES = {
    "upper": lambda s: s.isalpha() and s.isupper(),
    "lower": lambda s: s.isalpha() and s.islower(),
    "letter": str.isalpha,
    "digit": str.isdigit,
    "punct": lambda s: all(unicodedata.category(c).startswith("P") for c in s),
}
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", "|": "|", ",": ","}
_HELP = ("write a target as one token's text (escapes \\n \\t \\\\ \\| \\,), a name (" + ", ".join(NAMED)
         + "), a class (" + ", ".join(CLASSES) + "), or several joined by |, e.g. \"A|B|C\"")


@dataclass(frozen=True)
class Target:
    """A parsed target: its token ids (sorted), a readable name and a name safe for a folder."""

    ids: tuple[int, ...]
    name: str
    slug: str


def unescape(text: str) -> str:
    """``text`` with the target escapes (``\\n``, ``\\t``, ``\\\\``, ``\\|``, ``\\,``) replaced."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 >= len(text) or text[i + 1] not in _ESCAPES:
                got = text[i:i + 2]
                raise ConceptEvoError(f"unknown escape {got!r} in target {text!r}; use \\n, \\t, \\\\, \\| or \\,")
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def split_unescaped(text: str, sep: str) -> list[str]:
    """``text`` cut at every ``sep`` not preceded by a backslash escape (the escapes are kept for :func:`unescape`)."""
    parts, cur, i = [], [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if text[i] == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    parts.append("".join(cur))
    return parts


def _vocabulary(tokenizer) -> list[tuple[int, str]]:
    unknown = getattr(tokenizer, "UNKNOWN", None)
    out = []
    for i in range(int(tokenizer.vocab_size)):
        s = tokenizer.token_str(i)
        if s and s != unknown:
            out.append((i, s))
    return out


def _one_token(text: str, tokenizer, spec: str) -> int:
    if not text:
        raise ConceptEvoError(f"target {spec!r} has an empty alternative; {_HELP}")
    ids = list(tokenizer.encode(text))
    unknown = getattr(tokenizer, "UNKNOWN", None)
    if len(ids) == 1 and tokenizer.token_str(ids[0]) == text and text != unknown:
        return int(ids[0])
    if len(ids) == 1 or (unknown is not None and unknown in tokenizer.decode(ids)):
        raise ConceptEvoError(f"target {text!r} is not in the study's vocabulary (data/tokenizer.json); "
                              "give a token the text has")
    pieces = ", ".join(repr(tokenizer.token_str(i)) for i in ids[:8])
    raise ConceptEvoError(f"target {text!r} is {len(ids)} tokens for the study's tokenizer ({pieces}); give a single "
                          "token, or several as one set joined by |, e.g. \"" + "|".join(tokenizer.token_str(i) for i in ids[:3])
                          + "\"")


def _shown(text: str) -> str:
    for name, ch in NAMED.items():
        if text == ch and name not in ("comma", "pipe"):
            return name
    return repr(text)


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]", lambda m: f"u{ord(m.group()):04x}", name)
    return s if len(s) <= 48 else s[:32] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]


def parse_target(spec: str, tokenizer) -> Target:
    """The target ``spec`` (see the module docstring) as token ids of ``tokenizer``; a clear error when an
    alternative is not one token, or names nothing."""
    spec = str(spec)
    if not spec:
        raise ConceptEvoError(f"the target is empty; {_HELP}")
    ids: list[int] = []
    names, slugs = [], []
    for alt in split_unescaped(spec, "|"):
        if alt.startswith("="):
            text = unescape(alt[1:])
            ids.append(_one_token(text, tokenizer, spec))
            names.append(_shown(text)), slugs.append(text)
        elif alt in NAMED:
            ids.append(_one_token(NAMED[alt], tokenizer, spec))
            names.append(alt), slugs.append(alt)
        elif alt in CLASSES:
            members = [i for i, s in _vocabulary(tokenizer) if CLASSES[alt](s)]
            if not members:
                raise ConceptEvoError(f"target class {alt!r} has no token in the study's vocabulary; name tokens instead")
            ids += members
            names.append(f"{alt} ({len(members)} tokens)"), slugs.append(alt)
        else:
            text = unescape(alt)
            ids.append(_one_token(text, tokenizer, spec))
            names.append(_shown(text)), slugs.append(text)
    uniq = tuple(sorted(set(ids)))
    return Target(uniq, " | ".join(names), _slug("+".join(slugs)))


def parse_targets(text: str, tokenizer) -> list[Target]:
    """Several targets separated by commas (``newline,upper,\\,``); a literal comma is ``comma`` or ``\\,``."""
    parts = [p for p in split_unescaped(str(text), ",")]
    if any(not p for p in parts):
        raise ConceptEvoError(f"empty target in {text!r}; separate targets by single commas, and write a comma "
                              "target as comma or \\,")
    return [parse_target(p, tokenizer) for p in parts]


# ------------------------------------------------------------------------------------------ occurrences
def _windows_of(windows):
    """(TextWindows, the split's window numbers) for TextWindows or a Subset of them."""
    if getattr(windows, "token_windows", False) and hasattr(windows, "tokens"):
        return windows, np.arange(len(windows), dtype=np.int64)
    base = getattr(windows, "base", None)
    if base is not None and getattr(base, "token_windows", False) and hasattr(base, "tokens"):
        return base, np.asarray(windows.indices, dtype=np.int64)
    raise DatasetError("next-token targets need text windows (conceptevo.data.text.TextWindows, or a subset of them)")


class TargetOccurrences(Dataset):
    """Every (window, position) of ``windows`` whose true next token is in ``target``: a one-class dataset.

    Item ``i`` is ``(x, 0, i)``: ``x`` int64 ``[context + 2]``, the window's
    tokens, then the position ``p`` and the true next token. ``window[i]`` is
    the window's number in the full windows (as stimuli number them),
    ``position[i]`` is ``p``, ``next_token[i]`` the true next token. Occurrences
    are ordered by window, then position. ``classes`` is ``[target.name]``,
    ``targets`` all 0, and ``num_outputs`` the vocabulary size (the chance level
    of a top-1 hit is ``1 / num_outputs``).
    """

    #: iter_batches hands out batches through :meth:`batch` and keeps them integer
    token_windows = True

    def __init__(self, windows, target: Target, chunk: int = 4096):
        base, numbers = _windows_of(windows)
        self.base, self.target = base, target
        self.context = int(base.context)
        ids = np.asarray(target.ids, dtype=np.int64)
        offsets = np.arange(1, self.context + 1)
        wins, poss = [], []
        for s in range(0, len(numbers), chunk):
            w = numbers[s:s + chunk]
            nxt = np.asarray(base.tokens[(w * base.stride)[:, None] + offsets[None, :]], dtype=np.int64)
            r, p = np.nonzero(np.isin(nxt, ids))
            wins.append(w[r]), poss.append(p)
        self.window = np.concatenate(wins) if wins else np.zeros(0, np.int64)
        self.position = np.concatenate(poss).astype(np.int64) if poss else np.zeros(0, np.int64)
        if self.window.size == 0:
            raise DatasetError(f"target {target.name} is never the next token in the {len(numbers)} windows of this split; "
                               "pick a token the text has (see data/tokenizer.json), or a set of them joined by |")
        self.next_token = np.asarray(base.tokens[self.window * base.stride + self.position + 1], dtype=np.int64)
        self.targets = np.zeros(self.window.size, dtype=np.int64)
        self.classes = [target.name]
        tk = getattr(base, "tokenizer", None)
        self.num_outputs = int(tk.vocab_size) if tk is not None else None
        self.name = f"{getattr(base, 'name', 'text')} next-token {target.name}"

    def __len__(self) -> int:
        return int(self.window.size)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Occurrences ``indices`` stacked: ``(x int64 [B, context + 2], labels int64 [B] (all 0))``."""
        idx = np.asarray(indices, dtype=np.int64)
        starts = self.window[idx] * self.base.stride
        toks = np.asarray(self.base.tokens[starts[:, None] + np.arange(self.context)[None, :]], dtype=np.int64)
        x = np.concatenate([toks, self.position[idx, None], self.next_token[idx, None]], axis=1)
        return torch.from_numpy(x), torch.zeros(len(idx), dtype=torch.int64)

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"occurrence {i} out of range (0..{len(self) - 1})")
        x, _ = self.batch([i])
        return x[0], 0, i

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.name}|{self.context}|{self.base.stride}|{self.target.ids}".encode())
        for a in (self.window, self.position, self.next_token):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ the adapter
def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConceptEvoError(f"the language model returns {type(out).__name__}; it must return logits [batch, tokens, vocab] "
                          "or an object with .logits")


@contextmanager
def next_token_outputs(*models: nn.Module):
    """Within the block, each of ``models`` (language models) takes :class:`TargetOccurrences` inputs
    ``[B, context + 2]`` and returns ``[rows, vocab]`` log-probabilities at each item's position ``p``, the true
    next token's column swapped with column 0 (a permutation of the vocabulary).

    Hooks go on the models' root modules (layer names are unchanged) and are removed on exit. A forward with
    ``copies x B`` rows at the output (the reversion engine's forked batch, copies variant-major) takes each
    item's ``p`` and token once per copy. One model called inside another's forward with the very tensor that
    the other's hook stripped (as :func:`~conceptevo.importance.revert` does with model t) is not stripped again.
    """
    state: dict = {"stripped": None, "p": None, "tok": None}

    def pre(_mod, args, kwargs):
        x = args[0] if args else kwargs.get("input_ids")
        if x is state["stripped"]:
            return None
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.is_floating_point() or x.shape[1] < 3:
            raise ConceptEvoError("a model adapted by next_token_outputs takes next-token occurrences "
                                  "(TargetOccurrences: the window's ids, then the position and the true next token); "
                                  f"got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        ids, p, tok = x[:, :-2], x[:, -2], x[:, -1]
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= ids.shape[1]):
            raise ConceptEvoError(f"occurrence positions must lie in 0..{ids.shape[1] - 1}")
        state.update(stripped=ids, p=p, tok=tok)
        if args:
            return (ids,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "input_ids": ids}

    def post(_mod, _args, out):
        logits = _logits(out)
        p, tok = state["p"], state["tok"]
        rows, b = logits.shape[0], p.shape[0]
        if logits.dim() != 3 or rows % b:
            raise ConceptEvoError(f"the language model returned logits of shape {list(logits.shape)} for {b} windows; "
                                  "expected [batch (or copies x batch), tokens, vocab]")
        reps = rows // b
        p, tok = p.repeat(reps), tok.repeat(reps)
        r = torch.arange(rows, device=logits.device)
        logp = torch.log_softmax(logits[r, p.to(logits.device)], dim=-1)
        v = logp.shape[1]
        perm = torch.arange(v, device=logits.device).repeat(rows, 1)
        tok = tok.to(logits.device)
        perm[r, 0] = tok
        perm[r, tok] = 0
        return logp.gather(1, perm)

    handles = []
    try:
        for m in models:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            handles.append(m.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------ one-call versions
def _target(target, windows) -> Target:
    if isinstance(target, Target):
        return target
    base, _ = _windows_of(windows)
    if getattr(base, "tokenizer", None) is None:
        raise DatasetError("the text windows carry no tokenizer to read the target with; pass a Target")
    return parse_target(target, base.tokenizer)


def target_importance(model_from: nn.Module, model_to: nn.Module, windows, target, layers=None,
                      num_occurrences: int | None = 128, seed: int = 0, batch_size: int = 64, device="cpu",
                      progress: bool = True, channel_axis=None):
    """Eqs 5-7 for a target next token: every unit's share of sampled occurrences on which its evolution
    t -> t' raised the log-probability of the true next token (to first order).

    ``windows``: text windows (:class:`~conceptevo.data.text.TextWindows` or a subset); ``target``: a
    :class:`Target` or a spec for :func:`parse_target`. Returns ``(EvolutionImportance, TargetOccurrences)``;
    the importance's ``image_indices`` are occurrence numbers (``occ.window[i]``, ``occ.position[i]``).
    """
    from .scores import evolution_importance

    occ = TargetOccurrences(windows, _target(target, windows))
    with next_token_outputs(model_from, model_to):
        imp = evolution_importance(model_from, model_to, occ, 0, layers=layers, num_images=num_occurrences, seed=seed,
                                   batch_size=batch_size, device=device, progress=progress, channel_axis=channel_axis)
    return imp, occ


def evaluate_target_reversion(model_from: nn.Module, model_to: nn.Module, train_windows, test_windows, target,
                              layers=None, num_occurrences: int | None = 128, repeats: int = 5, seed: int = 0,
                              bins: int = 4, batch_size: int = 64, device="cpu", stage=None, progress: bool = True,
                              channel_axis=None):
    """Table 1 for a target next token: revert each importance bin's evolutions and measure the change of the
    true next token's top-1/top-5 accuracy and log-loss at the target's occurrences (``test_windows`` may be None:
    test columns NaN). Returns a :class:`~conceptevo.importance.ReversionResult` with metrics top1, top5, logloss."""
    from .reversion import evaluate_reversion

    tgt = _target(target, train_windows)
    train = TargetOccurrences(train_windows, tgt)
    test = TargetOccurrences(test_windows, tgt) if test_windows is not None else None
    with next_token_outputs(model_from, model_to):
        return evaluate_reversion(model_from, model_to, train, test, 0, layers=layers, num_images=num_occurrences,
                                  num_test_images=num_occurrences, repeats=repeats, seed=seed, bins=bins,
                                  batch_size=batch_size, device=device, stage=stage, progress=progress,
                                  channel_axis=channel_axis, log_loss=True)

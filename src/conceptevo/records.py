"""What conceptevo accepts, in one place: names (model names, checkpoint tags) and checkpoint records.

**Names** become folder names in a workspace and parts of the explorer's URLs.

A name is checked where it enters (the config's model names, the tags
:func:`~conceptevo.models.checkpoints.list_checkpoints` derives from file names
or reads from ``checkpoints.json``, and the workspace manifest when it is read);
every later user (workspace paths, the explorer's URLs, the static export)
accepts exactly the names this rule allows.

Allowed: 1 to 200 bytes (UTF-8) of printable characters, except ``/ \\ : , %``;
not starting with ``.`` and not starting or ending with a space. So
``resnet 18 (dropout)`` and ``epoch=3-step=100`` are names; ``..``, ``a/b``,
``e5:e21`` (a stage is written FROM:TO), ``a,b`` (the explorer's ``panels=``
list) and ``50%`` (URLs) are not.

**Checkpoint records** (rows of a model's ``checkpoints.json`` and of the
workspace manifest) are checked when read: every command then relies on their
types (a tag that is a name, an epoch that is a finite number...).
"""
from __future__ import annotations

import math
import unicodedata

from .errors import ConceptEvoError

MAX_BYTES = 200
FORBIDDEN = "/\\:,%"
RULE = (f"names may use letters, digits, spaces and punctuation except {' '.join(FORBIDDEN)}, "
        f"must not start with '.' or start or end with a space, and are at most {MAX_BYTES} bytes")


def name_problem(name) -> str | None:
    """What is wrong with ``name`` as a model name or checkpoint tag, or None when it is fine."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        return f"is longer than {MAX_BYTES} bytes"
    if name.startswith("."):
        return "starts with '.'"
    if name != name.strip():
        return "starts or ends with a space"
    for c in name:
        if c in FORBIDDEN:
            return f"contains {c!r}"
        if unicodedata.category(c)[0] == "C":  # control, format, surrogate (undecodable file name), private, unassigned
            return f"contains the non-printable character U+{ord(c):04X}"
    return None


def is_valid_name(name) -> bool:
    return name_problem(name) is None


def check_name(kind: str, name, error=ConceptEvoError, fix: str = "rename it") -> str:
    """``name`` unchanged, or ``error`` saying what is wrong with it (``kind``: e.g. "model name")."""
    problem = name_problem(name)
    if problem is not None:
        raise error(f"{kind} {name!r} {problem}; {RULE}: {fix}")
    return name


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def checkpoint_problem(row) -> str | None:
    """What is wrong with one checkpoint record, or None when it is fine.

    A record is an object with ``tag`` (a name), ``path`` (a string), and
    optionally ``epoch`` (a finite number >= 0 or null), ``step`` (an integer
    >= 0 or null) and ``metrics`` (an object of finite numbers or nulls).
    """
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an object"
    tag = row.get("tag")
    problem = name_problem(tag)
    if problem is not None:
        return f"has a tag {tag!r} that {problem}" if isinstance(tag, str) else "has no string 'tag'"
    # an empty path is a checkpoint known only from results in memory (Workspace.from_results): no file to load
    if not isinstance(row.get("path"), str) or "\x00" in row["path"]:
        return f"(tag {tag!r}) has no file 'path'"
    epoch = row.get("epoch")
    if epoch is not None and not (_number(epoch) and epoch >= 0):
        return f"(tag {tag!r}) has epoch {epoch!r}, not a finite number >= 0 or null"
    step = row.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        return f"(tag {tag!r}) has step {step!r}, not an integer >= 0 or null"
    metrics = row.get("metrics", {})
    if not isinstance(metrics, dict):
        return f"(tag {tag!r}) has metrics {metrics!r}, not an object"
    for key, value in metrics.items():
        if value is not None and not _number(value):
            return f"(tag {tag!r}) has metric {key!r} = {value!r}, not a finite number or null"
    return None


def duplicate_tag(rows) -> str | None:
    """The first tag two records share, or None."""
    seen = set()
    for row in rows:
        if row["tag"] in seen:
            return row["tag"]
        seen.add(row["tag"])
    return None

"""Atomic, durable file writes: temporary file in the same folder, fsync, rename.

A reader never sees a half-written file under its final name. A write that
fails (a full disk included) leaves the old file, if any, untouched and no
temporary file behind. Readers turn a missing, truncated or foreign file into a
:class:`~conceptevo.errors.DamagedFileError` naming it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import DamagedFileError, StorageError

#: Temporary files are named ``.NAME.~PID~RANDOM[SUFFIX].tmp`` next to their target (PID: the writer's).
TEMP_SUFFIX = ".tmp"
_TEMP_PID = re.compile(r"\.~(\d+)~[^/]*\.tmp$")
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success fsync it and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.~{os.getpid()}~", suffix=suffix + TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise _no_space(path, e) from e
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise _no_space(path, e) from e
        raise


#: No creation date (and a fixed SVG id salt, below) in vector files, so the same inputs give the same bytes.
_REPRODUCIBLE = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


def save_figure(fig, path, formats=None, dpi="figure", **savefig_kwargs) -> list[Path]:
    """Write a matplotlib figure atomically; the caller still closes it.

    Without ``formats``: PNG at exactly ``path``. With them: one file per
    format, ``path`` with its suffix replaced. Vector files are reproducible
    (no dates, fixed ids).
    """
    import matplotlib

    path = Path(path)
    targets = [(path, "png")] if formats is None else [(path.with_suffix("." + f), f) for f in formats]
    for target, fmt in targets:
        with atomic_path(target, suffix="." + fmt) as tmp:
            with matplotlib.rc_context({"svg.hashsalt": "conceptevo"}):
                fig.savefig(tmp, dpi=dpi, format=fmt, metadata=_REPRODUCIBLE.get(fmt), **savefig_kwargs)
    return [t for t, _ in targets]


def _no_space(path: Path, e: OSError) -> StorageError:
    return StorageError(
        f"no space left to write {path} ({e.strerror or e}); nothing half-written was kept: "
        "free some space and rerun (finished stages are kept)"
    )


def _damaged(path, e: BaseException) -> DamagedFileError:
    detail = (str(e).splitlines() or [""])[0][:160]
    return DamagedFileError(
        f"cannot read {path} ({type(e).__name__}: {detail}); the file is damaged or not one conceptevo wrote "
        "(its writes are atomic, so it was truncated or changed afterwards): restore it, "
        "or recompute into a new folder with `conceptevo run`"
    )


def remove_orphan_temporaries(folder) -> int:
    """Delete temporary files under ``folder`` left by writers that no longer run (killed mid-write).

    Only files named as :func:`atomic_path` names them, and only those whose
    writer's process id is gone, are removed. Returns how many were removed.
    """
    removed = 0
    for p in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        m = _TEMP_PID.search(p.name)
        if m is None or not p.is_file() or _pid_alive(int(m.group(1))):
            continue
        try:
            p.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_json(path):
    """Parse a JSON file; a missing or undecodable file is a DamagedFileError naming it."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        raise DamagedFileError(f"{path} is missing; restore it, or recompute into a new folder with `conceptevo run`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _damaged(path, e) from None


def save_npy(path, array) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def load_npy(path, mmap: bool = False) -> np.ndarray:
    """Read a ``.npy`` array (never a pickle); a missing, truncated or foreign file is a DamagedFileError."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise DamagedFileError(f"{path} is missing; restore it, or recompute into a new folder with `conceptevo run`") from None
    except Exception as e:  # numpy raises ValueError, OSError, EOFError, zipfile errors... on junk
        raise _damaged(path, e) from None
    if not isinstance(arr, np.ndarray):  # a .npz archive under a .npy name
        close = getattr(arr, "close", None)
        if close:
            close()
        raise _damaged(path, ValueError("not a single .npy array"))
    return arr


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

"""Atomic, durable file writes: temporary file in the same folder, fsync, rename.

A reader never sees a half-written file under its final name. A write that
fails (a full disk included) leaves the old file, if any, untouched and no
temporary file behind. New files get the usual permissions (``0o666`` less the
process's umask), as ``open`` would give them.

Readers call a file damaged (:class:`~conceptevo.errors.DamagedFileError`) only
when it is missing or its contents are malformed. A file that cannot be read
for another reason (too many open files, permission, a failing disk) is a
:class:`~conceptevo.errors.FileAccessError` that says so. ``.npy`` headers are
parsed here by a strict parser of the one dict numpy writes, not by numpy's
``ast.literal_eval`` (which, on CPython 3.11, can fail with a ``SystemError``
when threads parse at once, CPython gh-106905).
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import DamagedFileError, FileAccessError, StorageError

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
        fd, tmp = _create_temporary(path, suffix)
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


def _create_temporary(path: Path, suffix: str) -> tuple[int, Path]:
    """Create a new, empty temporary file next to ``path``, named for :func:`remove_orphan_temporaries`.

    Created with mode ``0o666``, from which the kernel takes away the umask, as
    for any file ``open`` creates (``tempfile.mkstemp`` would make it ``0o600``,
    and the file keeps that mode when it is renamed into place).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.~{os.getpid()}~{secrets.token_hex(4)}{suffix}{TEMP_SUFFIX}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


#: No creation date (and a fixed SVG id salt, below) in vector files, so the same inputs give the same bytes.
_REPRODUCIBLE = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


def new_figure(**kwargs):
    """A matplotlib ``Figure`` drawn by its own Agg canvas: no pyplot, so the global backend and figure list are untouched.

    ``kwargs`` go to :class:`matplotlib.figure.Figure` (``figsize``, ``dpi``,
    ``layout``...). Such a figure saves with :func:`save_figure`, and a
    notebook shows it inline when it is the value of a cell (it has a ``_repr_png_``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from .figure import ShownFigure

    fig = ShownFigure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def figure_paths(path, formats=None) -> list[Path]:
    """The files :func:`save_figure` writes for ``path`` and ``formats``."""
    path = Path(path)
    return [path] if formats is None else [path.with_suffix("." + f) for f in formats]


def save_figure(fig, path, formats=None, dpi="figure", **savefig_kwargs) -> list[Path]:
    """Write a matplotlib figure atomically; the caller still closes it.

    Without ``formats``: PNG at exactly ``path``. With them: one file per
    format, ``path`` with its suffix replaced. Vector files are reproducible
    (no dates, fixed ids).
    """
    import matplotlib

    targets = list(zip(figure_paths(path, formats), formats or ("png",)))
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


def _missing(path) -> DamagedFileError:
    return DamagedFileError(f"{path} is missing; restore it, or recompute into a new folder with `conceptevo run`")


def _access_error(path, e: BaseException) -> FileAccessError:
    """A read that failed for a reason outside the file's contents, said as what it is, with the fix."""
    code = getattr(e, "errno", None)
    if isinstance(e, MemoryError) or code == errno.ENOMEM:
        what, fix = "there is not enough memory", "free some memory (or close other programs) and retry"
    elif code == errno.EMFILE:
        try:
            import resource

            limit = f" (its limit is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})"
        except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
            limit = ""
        what = f"this process has too many open files{limit}"
        fix = "close connections or programs holding files, or raise the limit (`ulimit -n`), and retry"
    elif code == errno.ENFILE:
        what, fix = "the system has too many open files", "close some programs and retry"
    elif code in (errno.EACCES, errno.EPERM):
        what, fix = "permission is denied", "give this user read access to it (chmod, chown) and retry"
    elif code in (errno.EIO, errno.ENXIO, getattr(errno, "ESTALE", errno.EIO), getattr(errno, "EREMOTEIO", errno.EIO)):
        what, fix = "the disk or file system reported an input/output error", "check the disk or network share and retry"
    else:
        what, fix = f"the system refused ({getattr(e, 'strerror', None) or e})", "fix that and retry"
    return FileAccessError(f"cannot read {path}: {what} (which says nothing about the file's contents); {fix}")


def _read_error(path, e: BaseException) -> DamagedFileError | FileAccessError:
    """The error for an exception raised while opening or reading ``path``: missing, damaged or not accessible."""
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return _missing(path)
    if isinstance(e, IsADirectoryError):
        return _damaged(path, ValueError("a folder where a file should be"))
    if isinstance(e, (OSError, MemoryError)):
        return _access_error(path, e)
    return _damaged(path, e)


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
            data = f.read()
    except (OSError, MemoryError) as e:
        raise _read_error(path, e) from None
    try:
        return json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _damaged(path, e) from None
    except MemoryError as e:
        raise _access_error(path, e) from None


def save_npy(path, array) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def load_npy(path, mmap: bool = False) -> np.ndarray:
    """Read a ``.npy`` array (never a pickle); ``mmap``: a read-only memory map instead of a copy in memory.

    A missing, truncated or foreign file is a DamagedFileError; a file that
    cannot be opened or read (open-file limit, permission, disk) a
    FileAccessError. The header is parsed by :func:`parse_npy_header`.
    """
    try:
        f = open(path, "rb")
    except (OSError, MemoryError) as e:
        raise _read_error(path, e) from None
    with f:
        try:
            head = f.read(_NPY_PREFIX)
            if head[:4] == b"PK\x03\x04":  # a .npz archive under a .npy name
                raise ValueError("not a single .npy array (a .npz archive)")
            if len(head) < _NPY_PREFIX or head[:6] != _NPY_MAGIC:
                raise ValueError("no .npy header (the file does not start with the .npy magic)")
            major, minor = head[6], head[7]
            if (major, minor) not in _NPY_VERSIONS:
                raise ValueError(f"unknown .npy format version {major}.{minor}")
            size_format, encoding = _NPY_VERSIONS[(major, minor)]
            raw = f.read(struct.calcsize(size_format))
            if len(raw) < struct.calcsize(size_format):
                raise ValueError("the header is cut short")
            (header_len,) = struct.unpack(size_format, raw)
            if header_len > _NPY_MAX_HEADER:
                raise ValueError(f"a header of {header_len} bytes (numpy writes a few hundred)")
            header = f.read(header_len)
            if len(header) < header_len:
                raise ValueError("the header is cut short")
            shape, fortran, dtype = parse_npy_header(header.decode(encoding))
            offset = _NPY_PREFIX + struct.calcsize(size_format) + header_len
            count = math.prod(shape)
            nbytes = count * dtype.itemsize
            have = os.fstat(f.fileno()).st_size - offset
            if have < nbytes:
                raise ValueError(f"truncated: {have} bytes of data where its header announces {nbytes}")
        except UnicodeDecodeError as e:
            raise _damaged(path, e) from None
        except ValueError as e:
            raise _damaged(path, e) from None
        except (OSError, MemoryError) as e:
            raise _read_error(path, e) from None
        order = "F" if fortran else "C"
        try:
            if nbytes == 0:  # nothing to map: an empty array, read-only like a map
                empty = np.empty(shape, dtype=dtype, order=order)
                empty.flags.writeable = not mmap
                return empty
            if mmap:
                return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
            flat = np.empty(count, dtype=dtype)
            _read_exactly(f, flat.view(np.uint8), nbytes)
            return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
        except (OSError, MemoryError) as e:
            raise _read_error(path, e) from None
        except EOFError:  # the file shrank while it was read
            raise _damaged(path, ValueError("truncated while it was read")) from None
        except ValueError as e:  # a shape numpy cannot make (more than 64 dimensions, too large to index)
            raise _damaged(path, e) from None


def _read_exactly(f, out, nbytes: int) -> None:
    view = memoryview(out)
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise EOFError
        got += n


_NPY_MAGIC = b"\x93NUMPY"
_NPY_PREFIX = 8  # magic + major + minor
_NPY_VERSIONS = {(1, 0): ("<H", "latin1"), (2, 0): ("<I", "latin1"), (3, 0): ("<I", "utf8")}
_NPY_MAX_HEADER = 10_000  # numpy's own limit for headers it reads without trust
_NPY_TOKEN = re.compile(r"""[ \t\r\n]*(?:(?P<str>'[^'\\\n]*'|"[^"\\\n]*")|(?P<int>0|[1-9][0-9]*)L?|(?P<word>True|False)|(?P<sym>[{}():,]))""")


def parse_npy_header(text: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` from a ``.npy`` header, or ValueError naming what is wrong.

    The header is the literal dict numpy writes, e.g.
    ``{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }``: keys
    ``descr`` (a dtype string), ``fortran_order`` (True/False) and ``shape`` (a
    tuple of non-negative integers), in any order, then spaces and a newline.
    Nothing else is accepted, and nothing is evaluated: a plain regular-expression
    tokenizer and a few lines of grammar, safe to run from any number of threads.
    Structured (record) and object dtypes are refused: conceptevo never writes them.
    """
    bad = ValueError(f"malformed .npy header {text.strip()[:120]!r}")
    tokens: list[tuple[str, str]] = []
    pos, end = 0, len(text.rstrip(" \t\r\n"))
    while pos < end:
        m = _NPY_TOKEN.match(text, pos, end)
        if m is None:
            raise bad
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    it = iter(tokens)

    def take(kind=None, value=None):
        tok = next(it, None)
        if tok is None or (kind is not None and tok[0] != kind) or (value is not None and tok[1] != value):
            raise bad
        return tok

    def shape_tuple():  # after "(": "()", "(3,)", "(3, 4)", "(3, 4,)"; "(3)" is not a tuple
        dims = []
        tok = take()
        while tok != ("sym", ")"):
            if tok[0] != "int":
                raise bad
            dims.append(int(tok[1]))
            sep = take("sym")[1]
            if sep == ")":
                if len(dims) == 1:
                    raise bad
                break
            if sep != ",":
                raise bad
            tok = take()
        return tuple(dims)

    take("sym", "{")
    d: dict = {}
    tok = take()
    while tok != ("sym", "}"):
        if tok[0] != "str":
            raise bad
        key = tok[1][1:-1]
        if key in d:
            raise ValueError(f"the .npy header gives {key!r} twice")
        take("sym", ":")
        kind, value = take()
        if kind == "str":
            d[key] = value[1:-1]
        elif kind == "word":
            d[key] = value == "True"
        elif (kind, value) == ("sym", "("):
            d[key] = shape_tuple()
        else:
            raise bad
        sep = take("sym")[1]
        if sep == "}":
            break
        if sep != ",":
            raise bad
        tok = take()
    if next(it, None) is not None:
        raise bad
    return _npy_fields(d, text)


def _npy_fields(d: dict, text: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    if set(d) != {"descr", "fortran_order", "shape"}:
        raise ValueError(f"the .npy header has keys {sorted(d)}, not descr, fortran_order and shape")
    descr, fortran, shape = d["descr"], d["fortran_order"], d["shape"]
    if not isinstance(descr, str):
        raise ValueError(f"the .npy header's descr is {descr!r}, not a dtype string")
    if not isinstance(fortran, bool):
        raise ValueError(f"the .npy header's fortran_order is {fortran!r}, not True or False")
    if not isinstance(shape, tuple):
        raise ValueError(f"the .npy header's shape is {shape!r}, not a tuple")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError, SyntaxError, OverflowError) as e:
        raise ValueError(f"the .npy header's descr {descr!r} is not a dtype ({e})") from None
    if dtype.hasobject:
        raise ValueError("it holds Python objects (a pickle), which conceptevo never reads")
    if dtype.names is not None or dtype.subdtype is not None:
        raise ValueError(f"a structured array ({descr!r}), which conceptevo never writes")
    return shape, fortran, dtype


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

"""How often a healthy .npy file fails to load when threads load at once under garbage collection.

CPython 3.11 keeps the AST constructor's recursion depth in state shared by all
threads; when a thread switch lands inside one thread's ``ast.literal_eval`` and
another thread parses meanwhile, the first one fails with ``SystemError: AST
constructor recursion depth mismatch`` (CPython gh-106905, fixed in later
releases). numpy parses every ``.npy`` header with ``ast.literal_eval``.

The harness (``tests/switching.py``, as in ``test_npy_loads_from_many_threads_under_garbage_collection``,
run longer): 8 threads, each at a different C stack depth, load healthy files in a
loop while every garbage collection hands the interpreter to another thread
(a gc callback that sleeps 0 s; collections every 50 allocations). Rows, each for
``--seconds``: ``ast.literal_eval`` on the header numpy writes, ``np.load``, and
``conceptevo.io.load_npy``. Prints loads and failures per row.

    python bench/reliability_npy_threads.py [--seconds 20]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
from conceptevo.io import load_npy, save_npy  # noqa: E402
from switching import deep, gc_switching  # noqa: E402

THREADS = 8


def run(fn, seconds: float) -> tuple[int, dict[str, int]]:
    loads, failures = [0] * THREADS, {}
    stop = time.monotonic() + seconds

    def work(t):
        while time.monotonic() < stop:
            try:
                deep(3 * t, fn)
                loads[t] += 1
            except Exception as e:  # noqa: BLE001 - counted
                key = f"{type(e).__name__}: {str(e).split('(')[0].strip()[:60]}"
                failures[key] = failures.get(key, 0) + 1

    with gc_switching():
        threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return sum(loads), failures


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per row")
    args = ap.parse_args()
    import ast

    folder = Path(tempfile.mkdtemp())
    path = folder / "a.npy"
    save_npy(path, np.arange(100, dtype=np.float32))
    header = path.read_bytes()[10:].split(b"\n", 1)[0].decode("latin1")
    rows = [("ast.literal_eval (numpy's header parse)", lambda: ast.literal_eval(header)),
            ("np.load", lambda: np.load(path, allow_pickle=False)),
            ("conceptevo.io.load_npy", lambda: load_npy(path)),
            ("conceptevo.io.load_npy (mmap)", lambda: load_npy(path, mmap=True))]
    print(f"Python {platform.python_version()}, numpy {np.__version__}, {THREADS} threads, {args.seconds:.0f} s per row")
    print(f"{'what':42} {'calls':>9} {'failed':>7}  failures")
    for name, fn in rows:
        n, failures = run(fn, args.seconds)
        failed = sum(failures.values())
        print(f"{name:42} {n + failed:>9} {failed:>7}  {failures or ''}", flush=True)


if __name__ == "__main__":
    main()

"""The conditions under which CPython 3.11's ast.literal_eval fails in threads (gh-106905), for the .npy tests.

Threads call at different C stack depths (:func:`deep`), and every garbage
collection hands the interpreter to another thread (:func:`gc_switching`), so
that a switch can land inside one thread's parse while another parses.
"""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager


def deep(depth: int, fn):
    """``fn()`` called ``depth`` levels down, each level a C-level call (through ``map``)."""
    return fn() if depth == 0 else next(map(lambda _: deep(depth - 1, fn), [0]))


@contextmanager
def gc_switching(threshold: int = 50):
    """Inside: a collection every ``threshold`` allocations, each starting with a thread switch."""
    switch = lambda phase, info: time.sleep(0) if phase == "start" else None  # noqa: E731
    old = gc.get_threshold()
    gc.callbacks.append(switch)
    gc.set_threshold(threshold, 5, 5)
    try:
        yield
    finally:
        gc.callbacks.remove(switch)
        gc.set_threshold(*old)

"""The argmax token's patch of a token-shaped unit, and its mark on the whole image."""
from __future__ import annotations

import numpy as np
import pytest

from conceptevo.models import build_model
from conceptevo.patches.marks import draw_mark, token_box, token_grid
from conceptevo.patches.sheets import _resize


def test_token_box_agrees_with_the_vits_own_geometry():
    vit = build_model("vit_tiny", dim=16, depth=1, heads=2, mlp=8)
    assert token_grid(50, (28, 28)) == (1, 4)
    assert token_box(0, 50, (28, 28)) == (0, 0, 28, 28)
    for t in range(1, 50):
        assert token_box(t, 50, (28, 28)) == vit.token_patch(t)
    vit7 = build_model("vit_tiny", dim=16, depth=1, heads=2, mlp=8, patch=7)
    assert all(token_box(t, 17, (28, 28)) == vit7.token_patch(t) for t in range(1, 17))


def test_token_grid_without_class_token_and_none():
    assert token_grid(49, (28, 28)) == (0, 4)
    assert token_box(8, 49, (28, 28)) == (4, 4, 8, 8)
    assert token_grid(6, (16, 24)) == (0, 8) and token_box(4, 6, (16, 24)) == (8, 8, 16, 16)  # a 2 x 3 grid
    assert token_grid(51, (28, 28)) is None and token_box(3, 51, (28, 28)) is None  # e.g. register tokens


@pytest.mark.parametrize("channels", [1, 3])
def test_draw_mark_outlines_the_patch_and_nothing_else(channels):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 28, channels), dtype=np.uint8)
    P = 56
    cell = _resize(image, P)  # x2
    marked = draw_mark(cell, (0, 0, 28, 28), (8, 12, 12, 16))
    changed = (marked != cell).any(axis=-1)
    # the outline is the ring just outside pixels 16..23 x 24..31 of the cell (grey: and a black ring around it)
    ring = np.zeros((P, P), bool)
    ring[15, 23:33] = ring[24, 23:33] = ring[15:25, 23] = ring[15:25, 32] = True
    outer = np.zeros((P, P), bool)
    outer[14, 22:34] = outer[25, 22:34] = outer[14:26, 22] = outer[14:26, 33] = True
    assert not (changed & ~ring & ~outer).any()
    assert (marked[16:24, 24:32] == cell[16:24, 24:32]).all()  # the patch itself untouched
    if channels == 3:
        assert (marked[ring] == (255, 48, 48)).all() and not changed[outer].any()
    else:
        assert (marked[ring] == 255).all() and (marked[outer] == 0).all()
    # the class token's box (the whole image) becomes a frame on the border
    frame = (draw_mark(cell, (0, 0, 28, 28), (0, 0, 28, 28)) != cell).any(axis=-1)
    assert frame[0].any() and frame[-1].any() and not frame[1:-1, 1:-1].any()

"""Where a token-shaped unit's stimulus sits in its image: the argmax token's patch, marked on the whole image.

A ViT's unit has one value per token and every token sees the whole image
(attention mixes them all), so its example "patch" is the whole stimulus image,
with the patch of the token where the unit was strongest marked on it: a
rectangle outline around the token's pixels. :func:`token_box` finds the box from
the token grid alone; :func:`draw_mark` draws it into a patch cell.
"""
from __future__ import annotations

import numpy as np

RED = (255, 48, 48)


def token_grid(tokens: int, input_size: tuple[int, int]) -> tuple[int, int] | None:
    """``(leading, patch)`` for ``tokens`` tokens over an image of ``input_size`` (H, W), or None when no grid fits.

    The tokens are a row-major grid of square ``patch`` x ``patch`` pixel patches
    that tile the image exactly, after ``leading`` tokens (0, or 1 for a class
    token) that stand for the whole image. A class token is preferred where
    both readings fit (they cannot both fit a square image).
    """
    H, W = (int(s) for s in input_size)
    for leading in (1, 0):
        n = tokens - leading
        if n <= 0:
            continue
        for p in range(1, min(H, W) + 1):
            if H % p == 0 and W % p == 0 and (H // p) * (W // p) == n:
                return leading, p
    return None


def token_box(token: int, tokens: int, input_size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The pixel box ``(top, left, bottom, right)`` (end exclusive) of token ``token`` of ``tokens``.

    A leading (class) token's box is the whole image; None when the tokens form
    no grid over the image (:func:`token_grid`).
    """
    grid = token_grid(tokens, input_size)
    if grid is None:
        return None
    leading, p = grid
    H, W = (int(s) for s in input_size)
    if token < leading:
        return 0, 0, H, W
    r, c = divmod(int(token) - leading, W // p)
    return r * p, c * p, (r + 1) * p, (c + 1) * p


def draw_mark(cell: np.ndarray, crop: tuple[int, int, int, int], mark: tuple[int, int, int, int]) -> np.ndarray:
    """``cell`` ``[P, P, C]`` uint8 (``crop`` resized as :func:`~conceptevo.patches.sheets._resize` does) with
    ``mark`` (pixel box of the image) outlined just outside its pixels; a new array.

    Colour images get a red outline; grey ones a white outline inside a black one, which shows on dark and
    light backgrounds alike (the sheets keep their channels, so CNN and ViT patches stay comparable).
    """
    out = cell.copy()
    P, C = cell.shape[0], cell.shape[-1]
    t0, l0, b0, r0 = crop
    h, w = b0 - t0, r0 - l0
    scale = P / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    oy, ox = (P - nh) // 2, (P - nw) // 2
    t, l, b, r = mark
    y0 = oy + int(np.floor((t - t0) * scale)) - 1
    x0 = ox + int(np.floor((l - l0) * scale)) - 1
    y1 = oy + int(np.ceil((b - t0) * scale))
    x1 = ox + int(np.ceil((r - l0) * scale))
    if C >= 3:
        ys, xs = _ring(y0, x0, y1, x1, P)
        out[ys, xs, :3] = RED
        if C == 4:
            out[ys, xs, 3] = 255
    else:  # white, with a black ring around it
        ys, xs = _ring(y0 - 1, x0 - 1, y1 + 1, x1 + 1, P)
        out[ys, xs] = 0
        ys, xs = _ring(y0, x0, y1, x1, P)
        out[ys, xs] = 255
    return out


def _ring(y0: int, x0: int, y1: int, x1: int, P: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of the rectangle outline with corners (y0, x0), (y1, x1), clipped to a P x P cell."""
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, P - 1), min(x1, P - 1)
    ys = np.r_[np.full(x1 - x0 + 1, y0), np.full(x1 - x0 + 1, y1), np.arange(y0, y1 + 1), np.arange(y0, y1 + 1)]
    xs = np.r_[np.arange(x0, x1 + 1), np.arange(x0, x1 + 1), np.full(y1 - y0 + 1, x0), np.full(y1 - y0 + 1, x1)]
    return ys, xs

"""M-RoPE positions of the Qwen2-VL family: one (t, h, w) triple per token, computed on the host.

Equal to transformers' `Qwen2_5_VLModel.get_rope_index` for text and still images: a run of text tokens
counts on from the current position on all three rows; an image's tokens (its merged grid, row-major)
get t = cur, h = cur + row, w = cur + col, after which cur advances by max(rows, cols). Padding gets
position 0. Text-only rows are the 1D case (three equal rows).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

TEXT, IMAGE = 0, 1  # token types, as the processor's mm_token_type_ids


def rope_index(token_types: np.ndarray, grids: Sequence[tuple[int, int, int]], *, merge_size: int,
               valid: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Positions of one row.

    Args:
      token_types: int[T], TEXT or IMAGE per token.
      grids: the (t, h, w) patch grid of each image, in order (`qwen_vl_images.grid`); t must be 1.
      merge_size: the patch merger's spatial merge (2): an image has t·h·w / merge_size² tokens.
      valid: bool[T], False at padding (which gets position 0 and is skipped); default all True.

    Returns:
      (int32[3, T] positions, delta = max position + 1 − number of valid tokens: where decoding
      continues relative to the token count, transformers' `rope_deltas`).
    """
    token_types = np.asarray(token_types)
    valid = np.ones(token_types.shape, bool) if valid is None else np.asarray(valid, bool)
    kept = np.flatnonzero(valid)
    out = np.zeros((3, token_types.shape[0]), np.int32)
    pieces, cur, images = [], 0, iter(grids)
    for kind, group in itertools.groupby(token_types[kept].tolist()):
        n = len(list(group))
        if kind == TEXT:
            pieces.append(np.broadcast_to(np.arange(cur, cur + n), (3, n)))
            cur += n
            continue
        if kind != IMAGE:
            raise ValueError(f"token type {kind}: only text ({TEXT}) and still images ({IMAGE}) are supported")
        t, h, w = next(images, (0, 0, 0))
        if t != 1:
            raise ValueError(f"image grid {(t, h, w)}: still images have t = 1 (video is not supported)")
        rows, cols = h // merge_size, w // merge_size
        if rows * cols != n:
            raise ValueError(f"an image run of {n} tokens, but its grid {(t, h, w)} gives {rows * cols} (images "
                             "next to each other need text, e.g. vision start/end tokens, between them)")
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        pieces.append(np.stack([np.full(n, cur), cur + r.ravel(), cur + c.ravel()]))
        cur += max(rows, cols)
    if next(images, None) is not None:
        raise ValueError(f"{len(grids)} image grids for fewer image runs in the row")
    if pieces:
        out[:, kept] = np.concatenate(pieces, axis=1)
    return out, int(out[:, kept].max(initial=-1)) + 1 - len(kept)

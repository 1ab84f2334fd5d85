"""Weight updates merged into an engine's weights: W = W_base + the sum of some terms (what LoRAs add).

A term is either a LowRank(left, right), the update left @ right in the initializer's 2-D view as the model file
stores it ((shape[0], the product of the rest): a conv's (out, in * kh * kw), a Linear stored transposed (in, out)),
or a whole array of the initializer's shape (LyCORIS LoHa and LoKr, full diffs). Several low-rank terms on one
weight are one product of their stacked factors.

merge_into writes base + terms straight into an engine's own buffer, in the engine's layout (nchwc.py), a
megabyte of the product at a time: each product block is made in cache and added to the base on its way out, so a
switch reads the base and writes the weight once (for SD 1.5's UNet, 3.3 GB each way) next to the rank-r products'
arithmetic. merged_value gives a whole merged array for engines that take new weights as arrays.
"""

from typing import NamedTuple

import numpy as np

CHUNK_BYTES = 1 << 20  # one block of the product: small enough to stay in cache between the product and the add


class LowRank(NamedTuple):
    """The update left @ right of a weight's 2-D view (rows, cols) as stored in the model file."""

    left: np.ndarray  # (rows, r) float32
    right: np.ndarray  # (r, cols) float32


def stack(terms) -> tuple[LowRank | None, list[np.ndarray]]:
    """TERMS as one LowRank (their factors side by side; None without one) and the whole arrays among them."""
    low = [t for t in terms if isinstance(t, LowRank)]
    whole = [t for t in terms if not isinstance(t, LowRank)]
    if len(low) > 1:
        low = [LowRank(np.concatenate([t.left for t in low], axis=1), np.concatenate([t.right for t in low], axis=0))]
    return (low[0] if low else None), whole


def merged_value(base: np.ndarray, terms) -> np.ndarray:
    """BASE + TERMS as a new array of BASE's shape and dtype (the model file's layout)."""
    out = np.array(base, dtype=np.float32, copy=True)
    merge_into(out, out, "same", base.shape, terms)
    return out.astype(base.dtype, copy=False)


def merge_into(buffer: np.ndarray, base: np.ndarray, layout: str, shape: tuple, terms) -> None:
    """BUFFER = BASE + TERMS, BUFFER and BASE float32 in LAYOUT (nchwc.LAYOUTS) of a weight of file SHAPE; BASE may be
    BUFFER itself (the terms are then added to it)."""
    from sdrt.engines import nchwc

    low, whole = stack(terms)
    block = _block(layout, shape)
    if low is None:
        if base is not buffer:
            np.copyto(buffer, base)
    elif layout == "same":
        _merge_rows(buffer.reshape(low.left.shape[0], -1), base.reshape(low.left.shape[0], -1), low)
    elif block:
        _merge_blocked(buffer, base, layout, shape, block, low)
    else:  # channels padded to the block: rare (a 4-channel conv); the product is laid out whole
        update = (low.left @ low.right).reshape(shape)
        np.add(base, nchwc.to_layout(update, layout), out=buffer)
    for update in whole:
        np.add(buffer, nchwc.to_layout(np.asarray(update, np.float32).reshape(shape), layout), out=buffer)


def _block(layout: str, shape: tuple) -> int:
    """The NCHWc block of LAYOUT when SHAPE needs no padding in it (0: "same", or padded)."""
    if layout == "same":
        return 0
    block = int(layout.removeprefix("bibo").removeprefix("bo"))
    padded = shape[0] % block or (layout.startswith("bibo") and shape[1] % block)
    return 0 if padded else block


def _merge_rows(out: np.ndarray, base: np.ndarray, low: LowRank) -> None:
    """OUT (rows, cols) = BASE + left @ right, a block of rows at a time."""
    rows, cols = out.shape
    step = max(1, CHUNK_BYTES // (4 * cols))
    product = np.empty((min(step, rows), cols), np.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = np.matmul(low.left[r0:r1], low.right, out=product[: r1 - r0])
        np.add(base[r0:r1], block, out=out[r0:r1])


def _merge_blocked(out: np.ndarray, base: np.ndarray, layout: str, shape: tuple, block: int, low: LowRank) -> None:
    """OUT = BASE + left @ right in an NCHWc LAYOUT (nchwc.py): [O/B][K][Bo] where K runs over (I/B, H, W, Bi) for
    "bibo" and (I, H, W) for "bo". Each output block [o][K][Bo] is the product (K, r) @ (r, Bo) of the right factor's
    columns in K's order and the left factor's rows of that block: one batched product per chunk of output blocks."""
    out_ch, in_ch = shape[0], shape[1]
    kernel = tuple(shape[2:])
    rank = low.right.shape[0]
    right = low.right.reshape(rank, in_ch, *kernel)
    if layout.startswith("bibo"):  # columns (i, h, w) -> (i/B, h, w, bi)
        right = right.reshape(rank, in_ch // block, block, *kernel).transpose(1, 3, 4, 2, 0)
    else:
        right = right.transpose(1, 2, 3, 0)
    right = np.ascontiguousarray(right).reshape(-1, rank)  # (K, r)
    left = np.ascontiguousarray(low.left.reshape(out_ch // block, block, rank).transpose(0, 2, 1))  # (O/B, r, Bo)
    blocks, inner = out_ch // block, right.shape[0]
    out3, base3 = out.reshape(blocks, inner, block), base.reshape(blocks, inner, block)
    step = max(1, CHUNK_BYTES // (4 * inner * block))
    product = np.empty((min(step, blocks), inner, block), np.float32)
    for b0 in range(0, blocks, step):
        b1 = min(blocks, b0 + step)
        chunk = np.matmul(right, left[b0:b1], out=product[: b1 - b0])  # (K, r) @ (n, r, Bo) -> (n, K, Bo)
        np.add(base3[b0:b1], chunk, out=out3[b0:b1])


def merge_all(jobs, threads: int) -> None:
    """merge_into(*job) for each of JOBS, in THREADS threads, the largest weights first. Each thread's BLAS runs on one
    core: a rank-r product is too thin to split well (measured on SD 1.5's UNet, 2 cores: 1.6 s in one thread with
    BLAS on both, 1.2 s in two with BLAS on one each), and the adds, which BLAS does not do, run on every core."""
    jobs = sorted(jobs, key=lambda job: -job[0].nbytes)
    if threads < 2 or len(jobs) < 2:
        for job in jobs:
            merge_into(*job)
        return
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda job: merge_into(*job), jobs):
            pass


class WholeArrays:
    """merge_weights for an engine that takes new weights as whole arrays (its set_weights): the base values of the
    weights merged so far are read from the model file once (its read_weights) and kept, so later merges, and going
    back to the file's values, read nothing."""

    def __init__(self, engine):
        self.engine = engine
        self.base: dict[str, np.ndarray] = {}

    def merge(self, updates: dict[str, list]) -> None:
        needed = [name for name in updates if name not in self.base]
        if needed:
            self.base.update(self.engine.read_weights(needed))
        merged = {name: merged_value(self.base[name], terms) for name, terms in updates.items() if terms}
        self.engine.set_weights(merged)

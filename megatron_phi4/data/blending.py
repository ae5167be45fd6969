"""Deterministic weighted interleaving of datasets ("blending"), in closed form.

Megatron's ``build_blending_indices`` assigns sample ``i`` to the dataset whose achieved count is
furthest below its target (a sequential C++ loop). We compute the same kind of low-discrepancy
schedule without a loop: with weights ``w_d`` (normalized), the ``k``-th sample of dataset ``d``
gets the *time* ``t(d, k) = (k + 0.5) / w_d``; the blended stream is all ``(d, k)`` events ordered by
``(t, d)``. After ``n`` samples every dataset's count is within 1 of ``w_d * n`` (it is the
Sainte-Lague apportionment of ``n``), which is the same guarantee as Megatron's greedy rule.

Any range ``[a, b)`` of the stream is computed directly: the events ranked ``a..b-1`` have times in
``[a - D, b + D)`` (``D`` = number of datasets), so we generate only that window, sort it, and know
its starting rank exactly (``sum_d #{k: t(d, k) < a - D}``). The full index for 10M samples is built
in chunks in about a second; :class:`BlendedDataset` never materializes it at all (it computes the
chunk it needs, so memory is O(chunk) even for billions of samples).

The stream is a pure function of (weights, sample position): nothing depends on how it was chunked.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

__all__ = ["normalize_weights", "blend_range", "blend_counts", "build_blending_indices",
           "BlendedDataset"]

DEFAULT_CHUNK = 1 << 20


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        raise ValueError("blending: no datasets")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blending: weights must be finite, >= 0 and not all 0, got {list(w)}")
    return w / w.sum()


def _times(w: float, k: np.ndarray) -> np.ndarray:
    # The one expression that defines event times; everything else compares against it.
    return (k.astype(np.float64) + 0.5) / w


def _count_before(w: float, t: float) -> int:
    """#{k >= 0 : _times(w, k) < t} (exact w.r.t. the float expression above; Python floats and
    numpy float64 round + and / identically)."""
    w = float(w)
    if w <= 0:
        return 0  # a zero-weight dataset never gets a sample
    k = max(int(np.ceil(t * w - 0.5)), 0)
    # nudge to agree exactly with the float comparisons (monotone in k)
    while k > 0 and not ((k - 1 + 0.5) / w < t):
        k -= 1
    while (k + 0.5) / w < t:
        k += 1
    return k


def _window(w: np.ndarray, t0: float, t1: float):
    """Events with time in [t0, t1): (dataset ids, within-dataset indices) in stream order, and
    the per-dataset number of events before t0."""
    lo = np.array([_count_before(x, t0) for x in w], dtype=np.int64)
    hi = np.array([_count_before(x, t1) for x in w], dtype=np.int64)
    n = hi - lo
    ds = np.repeat(np.arange(len(w), dtype=np.int16), n)
    ks = np.concatenate([np.arange(lo[d], hi[d], dtype=np.int64) for d in range(len(w))]) \
        if n.sum() else np.zeros(0, np.int64)
    ts = np.concatenate([_times(w[d], ks[int(n[:d].sum()):int(n[:d + 1].sum())])
                         for d in range(len(w)) if n[d]]) if n.sum() else np.zeros(0)
    order = np.lexsort((ds, ts))  # by time, ties by dataset id
    return ds[order], ks[order], lo


def blend_range(weights, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16, dataset_sample_index int64) of blended samples ``start..stop-1``."""
    w = normalize_weights(weights)
    start, stop = int(start), int(stop)
    if stop <= start:
        return np.zeros(0, np.int16), np.zeros(0, np.int64)
    D = len(w)
    t0 = max(start - D - 1.0, 0.0)
    t1 = stop + D + 1.0
    ds, ks, lo = _window(w, t0, t1)
    base = int(lo.sum())
    a, b = start - base, stop - base
    assert a >= 0 and b <= len(ds), (start, stop, base, len(ds))
    return ds[a:b].copy(), ks[a:b].copy()


def blend_counts(weights, n: int) -> np.ndarray:
    """Per-dataset number of samples among the first ``n`` blended samples."""
    w = normalize_weights(weights)
    n = int(n)
    if n <= 0:
        return np.zeros(len(w), np.int64)
    D = len(w)
    t0 = max(n - D - 1.0, 0.0)
    ds, _, lo = _window(w, t0, n + D + 1.0)
    a = n - int(lo.sum())
    return lo + np.bincount(ds[:a].astype(np.int64), minlength=D)


def build_blending_indices(weights, num_samples: int, chunk: int = DEFAULT_CHUNK
                           ) -> Tuple[np.ndarray, np.ndarray]:
    """Whole blending index (like megatron's): dataset_index int16 [N], dataset_sample_index int64 [N]."""
    num_samples = int(num_samples)
    di = np.empty(num_samples, np.int16)
    si = np.empty(num_samples, np.int64)
    for a in range(0, num_samples, chunk):
        b = min(a + chunk, num_samples)
        di[a:b], si[a:b] = blend_range(weights, a, b)
    return di, si


class BlendedDataset:
    """Interleave ``datasets`` by ``weights``; sample ``i`` is ``datasets[d][k]`` with ``(d, k)``
    from :func:`blend_range`. ``size`` samples (each dataset must hold at least its share, see
    :func:`blend_counts`). Adds ``dataset_id`` to dict samples. Chunks are computed on demand and
    the last few kept (sequential access, as the pre-training sampler does, is O(1) amortized)."""

    def __init__(self, datasets: Sequence, weights, size: int, chunk: int = 1 << 16,
                 names: Sequence[str] = ()) -> None:
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        if len(self.datasets) != len(self.weights):
            raise ValueError(f"blending: {len(self.datasets)} datasets but {len(self.weights)} weights")
        self.size = int(size)
        self.chunk = int(chunk)
        self.names = list(names)
        need = blend_counts(self.weights, self.size)
        for d, ds in enumerate(self.datasets):
            if len(ds) < need[d]:
                nm = self.names[d] if d < len(self.names) else d
                raise ValueError(f"blending: dataset {nm} has {len(ds)} samples, the blend of "
                                 f"{self.size} samples needs {need[d]}")
        self.counts = need
        self._cache = {}

    def __len__(self) -> int:
        return self.size

    def locate(self, idx: int) -> Tuple[int, int]:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size}")
        c = idx // self.chunk
        hit = self._cache.get(c)
        if hit is None:
            a = c * self.chunk
            hit = blend_range(self.weights, a, min(a + self.chunk, self.size))
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[c] = hit
        j = idx - c * self.chunk
        return int(hit[0][j]), int(hit[1][j])

    def __getitem__(self, idx: int):
        d, k = self.locate(int(idx))
        item = self.datasets[d][k]
        if isinstance(item, dict):
            item = dict(item)
            item["dataset_id"] = d
        return item

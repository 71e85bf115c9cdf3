"""Nearest neighbours among feature vectors, by cosine similarity, tile by tile.

Shared by the audit's outlier score and the unfamiliar-image guard (headstart.familiarity):
both ask how far an image's features are from its k nearest training images'. Queries and
references are compared in tile x tile blocks, so memory stays at one block however many
images there are.
"""

from __future__ import annotations

import numpy as np

# Rows of each block of the similarity matrix: 2048 x 2048 float32 is 16 MiB.
TILE = 2048


def normalised(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity is then a dot product)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)


def nearest_distances(
    queries: np.ndarray, reference: np.ndarray, k: int, tile: int = TILE
) -> np.ndarray:
    """(Q, k) Euclidean distances, nearest first, from each unit-length query row to its k
    nearest unit-length reference rows (k <= len(reference)). Each query tile keeps its k
    highest similarities so far; the distance between unit vectors is sqrt(2 - 2 cos)."""
    if not 1 <= k <= len(reference):
        raise ValueError(f"k = {k} neighbours, but the reference has {len(reference)} rows")
    distances = np.empty((len(queries), k))
    for a in range(0, len(queries), tile):
        best = np.full((min(tile, len(queries) - a), k), -np.inf, dtype=np.float32)
        for b in range(0, len(reference), tile):
            block = queries[a : a + tile] @ reference[b : b + tile].T.astype(np.float32)
            both = np.concatenate([best, block], axis=1)
            keep = np.argpartition(-both, k - 1, axis=1)[:, :k]
            best = np.take_along_axis(both, keep, axis=1)
        best = -np.sort(-best, axis=1)  # similarities, nearest first
        distances[a : a + tile] = np.sqrt(np.maximum(2.0 - 2.0 * best.astype(np.float64), 0.0))
    return distances

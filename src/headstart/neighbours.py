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
# Queries whose k nearest vectors are gathered at once for the exact distances (C x k x D).
EXACT_CHUNK = 128


def normalised(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity is then a dot product)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)


def nearest_distances(
    queries: np.ndarray, reference: np.ndarray, k: int, tile: int = TILE
) -> np.ndarray:
    """(Q, k) Euclidean distances, nearest first, from each unit-length query row to its k
    nearest unit-length reference rows (k <= len(reference)).

    Each query tile keeps its k highest similarities so far and where they are. The distances
    of those k are then computed from the vectors, not as sqrt(2 - 2 cos): near 0 that formula
    turns float32 rounding of the cosine (1e-7) into errors of 5e-4, so an image and its
    near-copy would score differently in a batch of 1 and of 32."""
    if not 1 <= k <= len(reference):
        raise ValueError(f"k = {k} neighbours, but the reference has {len(reference)} rows")
    distances = np.empty((len(queries), k))
    for a in range(0, len(queries), tile):
        rows = queries[a : a + tile]
        best = np.full((len(rows), k), -np.inf, dtype=np.float32)
        where = np.zeros((len(rows), k), dtype=np.int64)
        for b in range(0, len(reference), tile):
            block = rows @ reference[b : b + tile].T.astype(np.float32)
            both = np.concatenate([best, block], axis=1)
            positions = np.concatenate(
                [where, np.broadcast_to(np.arange(b, b + block.shape[1]), block.shape)], axis=1
            )
            keep = np.argpartition(-both, k - 1, axis=1)[:, :k]
            best = np.take_along_axis(both, keep, axis=1)
            where = np.take_along_axis(positions, keep, axis=1)
        for c in range(0, len(rows), EXACT_CHUNK):
            nearest = reference[where[c : c + EXACT_CHUNK]].astype(np.float32)  # (C, k, D)
            gaps = rows[c : c + EXACT_CHUNK, None, :] - nearest
            distances[a + c : a + c + len(gaps)] = np.sort(np.linalg.norm(gaps, axis=2), axis=1)
    return distances

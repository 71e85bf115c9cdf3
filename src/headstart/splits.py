"""Assigning images to train, val and test from their content, never from listing order.

Identical bytes always land in the same split and adding images does not move existing ones
(except in classes so small that an image had to be moved to give them a val or test image).
"""

from __future__ import annotations

import hashlib

from headstart.errors import DataError
from headstart.folders import SPLITS, Sample, Skipped


def _unit_hash(sha256: str, seed: int) -> float:
    """A number in [0, 1) fixed by the file's content and the seed."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(
    samples: list[Sample],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    group_of: dict[str, str] | None = None,
) -> tuple[dict[str, str], list[Skipped]]:
    """Map each kept sample path to train/val/test; identical bytes share a split, and so do
    the files `group_of` (sha256 -> group key, headstart.near_copies) puts in one group.

    A sample's split is fixed by where its content hash falls: [0, test) is test,
    [test, test + val) is val, the rest train. That is stratified in expectation, stable when
    images are added, and independent of listing order. A class too small to receive a val or
    test image by chance gets the lowest-hash train images moved there, so every split of every
    class is non-empty.

    Pre-split layouts keep their folders' splits; only a split with no folder is carved from
    train as above. The same bytes in two pre-split folders stay only in the more held-out one
    (test, then val), so nothing leaks between splits.
    """
    labels_by_hash: dict[str, set[str]] = {}
    for sample in samples:
        labels_by_hash.setdefault(sample.sha256, set()).add(sample.label)
    conflicts = {h for h, labels in labels_by_hash.items() if len(labels) > 1}
    skipped = [
        Skipped(s.path, "conflicting_label", f"classes {sorted(labels_by_hash[s.sha256])}")
        for s in samples
        if s.sha256 in conflicts
    ]
    kept = [s for s in samples if s.sha256 not in conflicts]
    given_splits = {s.given_split for s in kept} - {None}
    if given_splits:
        held_out = {}  # sha256 -> the most held-out split its bytes appear in
        for sample in kept:
            rank = SPLITS.index(sample.given_split)
            held_out[sample.sha256] = max(held_out.get(sample.sha256, 0), rank)
        for sample in kept:
            if SPLITS.index(sample.given_split) < held_out[sample.sha256]:
                skipped.append(
                    Skipped(
                        sample.path,
                        "duplicate_across_splits",
                        f"also in {SPLITS[held_out[sample.sha256]]}",
                    )
                )
        kept = [s for s in kept if SPLITS.index(s.given_split) == held_out[s.sha256]]
    carve = [name for name in ("test", "val") if name not in given_splits]
    fractions = {
        "test": test_fraction if "test" in carve else 0.0,
        "val": val_fraction if "val" in carve else 0.0,
    }

    split: dict[str, str] = {
        s.path: s.given_split for s in kept if s.given_split in ("val", "test")
    }
    by_class: dict[str, list[Sample]] = {}
    for sample in kept:
        if sample.path not in split:
            by_class.setdefault(sample.label, []).append(sample)
    for label, members in sorted(by_class.items()):
        # Group identical bytes (and near-copies) so they move together, ordered by the hash
        # value of the group's key: the same key in another class gives the same split there.
        groups: dict[str, list[Sample]] = {}
        for sample in members:
            key = group_of.get(sample.sha256, sample.sha256) if group_of else sample.sha256
            groups.setdefault(key, []).append(sample)
        ordered = sorted(groups, key=lambda h: (_unit_hash(h, seed), h))
        assigned = {}
        for digest in ordered:
            u = _unit_hash(digest, seed)
            assigned[digest] = (
                "test"
                if u < fractions["test"]
                else ("val" if u < fractions["test"] + fractions["val"] else "train")
            )
        for name in carve:
            if name not in assigned.values():
                spare = [d for d in ordered if assigned[d] == "train"]
                if len(spare) < 2:
                    raise DataError(
                        f"class {label!r} has {len(members)} distinct image(s): too few to give "
                        f"train, val and test at least one each; add images to {label!r} or "
                        "remove the class folder"
                    )
                assigned[spare[0]] = name
        for digest, name in assigned.items():
            for sample in groups[digest]:
                split[sample.path] = name
    return split, skipped

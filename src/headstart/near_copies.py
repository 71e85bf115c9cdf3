"""Near-copies in prepare: images whose perceptual hashes are equal share a split, as files
with identical bytes do, so a resized or re-encoded copy of a test image cannot sit in train.

The hash is imagehash's pHash (64 bits from the low frequencies of the DCT of a 32x32
greyscale thumbnail), computed from the RGB image prepare decodes anyway. Only equal hashes
join: on the built-in 8x8 digits, a Hamming distance of 4 would already join 125 distinct
digits (of 1,797), while equal hashes join none (docs/audit.md#near-copies-in-prepare).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from headstart.folders import Sample


def perceptual_hash(image: Image.Image) -> str:
    """The image's 64-bit pHash as 16 hex digits."""
    import imagehash

    return str(imagehash.phash(image))


def split_groups(samples: list[Sample], near_copies: str) -> tuple[dict[str, str], dict]:
    """(each sample's sha256 -> the key of the group that must share a split, a summary).

    A group is the files connected by equal bytes or, with `near_copies == "phash"`, by equal
    perceptual hashes; its key is its smallest sha256, so an image joined to nothing keeps its
    own digest as key and its split does not move. Summary: groups that the hash joined (more
    than one distinct file content) and the images in them.
    """
    parent: dict[str, str] = {s.sha256: s.sha256 for s in samples}

    def root(digest: str) -> str:
        while parent[digest] != digest:
            parent[digest] = parent[parent[digest]]  # path halving
            digest = parent[digest]
        return digest

    if near_copies == "phash":
        first_with_hash: dict[str, str] = {}
        for sample in samples:
            if not sample.phash:
                continue
            other = first_with_hash.setdefault(sample.phash, sample.sha256)
            a, b = root(sample.sha256), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)  # the smaller digest stays the root
    key = {digest: root(digest) for digest in parent}
    members: dict[str, set[str]] = {}
    for digest, group in key.items():
        members.setdefault(group, set()).add(digest)
    joined = {group for group, digests in members.items() if len(digests) > 1}
    images = sum(key[s.sha256] in joined for s in samples)
    return key, {"near_copy_groups": len(joined), "near_copy_images": images}

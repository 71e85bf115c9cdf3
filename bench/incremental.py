"""Adding 1% of images: the incremental `dvc repro extract` (the store holds the rest) against
one from scratch (store off), on generated photos at 224 px with the default backbone.

In a throw-away git + DVC copy of the project (bench/project.py), side by side:
- first: `dvc repro extract` over --images photos with an empty store (fills it);
- --added-percent more photos, then `dvc repro extract`: prepare and extract find the first
  photos in the store and decode and extract only the new ones (incremental);
- `HEADSTART_CACHE=off dvc repro --force extract`: the same photos from scratch.
The two runs' features and prepared index must be byte-identical (compared as `cmp` does);
the store's size on disk per image is printed, and the ratio from scratch / incremental last.
Each time is the whole `dvc repro` command (Python and DVC start-up, prepare, extract).

    python bench/incremental.py                      # 10,000 photos, 1% added
    python bench/incremental.py --images 50000
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import tempfile
import time
from pathlib import Path

from project import make_repo, sh, stage_costs
from synthetic import make_photos

from headstart import store


def timed_repro(repo: Path, *options: str) -> tuple[float, str]:
    start = time.perf_counter()
    output = sh(repo, "dvc", "repro", *options, "extract")
    return time.perf_counter() - start, output


def costs(output: str) -> str:
    found = stage_costs(output)
    return ", ".join(f"{stage} {seconds:.1f} s" for stage, (seconds, _) in found.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--added-percent", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=224, help="backbone.image_size")
    parser.add_argument("--work", type=Path, help="keep the repository here (default: a temp)")
    args = parser.parse_args()
    root = args.work or Path(tempfile.mkdtemp(prefix="headstart-incremental-"))
    overrides = {"data.dir": "data/photos", "backbone.image_size": args.size}
    start = time.perf_counter()
    repo = make_repo(root, overrides, photos=args.images)
    print(f"{args.images} photos generated in {time.perf_counter() - start:.0f} s, in {repo}")
    os.environ[store.LOCATION_VARIABLE] = str(root / "store")
    os.environ.pop(store.SWITCH_VARIABLE, None)

    first, output = timed_repro(repo)
    print(f"first run, {args.images} photos, empty store: {first:.1f} s ({costs(output)})")
    added = round(args.images * args.added_percent / 100)
    make_photos(repo / "data" / "photos", args.images + added)
    total = args.images + added

    incremental, output = timed_repro(repo)
    print(f"incremental, {added} photos added: {incremental:.1f} s ({costs(output)})")
    for line in output.splitlines():
        if "found in the store" in line or "from the feature store" in line:
            print("   ", line.split(": ", 1)[-1].strip())
    kept = root / "incremental"
    shutil.copytree(repo / "data" / "features", kept / "features")
    shutil.copytree(repo / "data" / "prepared", kept / "prepared")

    os.environ[store.SWITCH_VARIABLE] = "off"
    scratch, output = timed_repro(repo, "--force")
    print(f"from scratch, {total} photos, store off: {scratch:.1f} s ({costs(output)})")
    different = []
    for folder in ("features", "prepared"):
        names = sorted(p.name for p in (repo / "data" / folder).iterdir())
        assert names == sorted(p.name for p in (kept / folder).iterdir()), folder
        for name in names:
            if not filecmp.cmp(repo / "data" / folder / name, kept / folder / name, shallow=False):
                different.append(f"{folder}/{name}")
    print(f"byte-identical features and index (cmp): {not different} {different or ''}")

    held = store.info(root / "store")
    for kind, counts in held["kinds"].items():
        per_image = counts["bytes"] / max(counts["entries"], 1)
        print(f"store {kind}: {counts['entries']} entries, {per_image:.0f} bytes on disk each")
    print(f"store in all: {held['bytes'] / 2**20:.1f} MiB, {held['bytes'] / total:.0f} bytes/image")
    print(f"from scratch / incremental: {scratch / incremental:.1f}x")


if __name__ == "__main__":
    main()

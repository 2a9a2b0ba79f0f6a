"""What checking a data root costs: `fedilora.prepared.check_prepared` hashes every file of the
prepared set (and of the splits) on each `split` and `federate`. Run on a prepared root (default
`data`, after `fedilora prepare && fedilora split`); writes benchmarks/results/manifest.json.

    python benchmarks/manifest.py [--root data] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from fedilora import prepared
from fedilora.paths import DataPaths
from fedilora.atomic import read_manifest


def _bytes(manifest: dict) -> int:
    def size(part: dict) -> int:
        return sum(size(f) for f in part["files"].values()) if "files" in part else part["size"]

    return sum(size(p) for p in manifest["parts"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("data"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "manifest.json")
    args = parser.parse_args()
    paths = DataPaths(args.root, "emoji")
    hashed = sum(_bytes(read_manifest(args.root, name)) for name in (prepared.PREPARE, prepared.SPLIT))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        prepared.check_prepared(paths)
        times.append(time.perf_counter() - start)
    result = {
        "what": "prepared.check_prepared (prepare + split sets): SHA-256 of every file, manifests compared",
        "root": str(args.root),
        "bytes_hashed": hashed,
        "seconds": {"min": min(times), "median": sorted(times)[len(times) // 2], "max": max(times)},
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

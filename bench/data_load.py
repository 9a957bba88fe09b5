"""Time the data pipeline on the real set: a cold cache build and cached loads.

    python bench/data_load.py                                   # ../shared/data/alzheimer4class, or $BRAINVQ_DATA
    python bench/data_load.py --data-dir DIR --json out/bench_data_load.json

The cold build uses a fresh temporary cache folder (removed afterwards), so every image is decoded; the OS
page cache is left alone, so the image files themselves may already be in memory. The cached load is
load_split of train, val and test from that warm cache, repeated; the median of the repeats is the figure
held against the goal (every repeat is in the JSON). Ends by printing the figures as one JSON line on stdout.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from brainvq import data  # noqa: E402
from brainvq.io import write_report  # noqa: E402

GOAL_CACHED_S = 0.5
GOAL_BUILD_S = 30
SPLITS = ("train", "val", "test")


def default_data_dir() -> str:
    return os.environ.get("BRAINVQ_DATA") or str(REPO_ROOT.parent / "shared" / "data" / "alzheimer4class")


def timed_load_all(root: Path, seed: int, cache_dir: Path) -> tuple[dict[str, float], dict[str, int]]:
    times, sizes = {}, {}
    for split in SPLITS:
        start = time.perf_counter()
        slice_set = data.load_split(root, split, seed, cache_dir=cache_dir)
        times[split] = time.perf_counter() - start
        sizes[split] = len(slice_set)
    return times, sizes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=default_data_dir(), help="data root (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--repeats", type=int, default=5, help="cached-load repeats (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    root = Path(args.data_dir).expanduser()
    layout = data.detect_layout(root)  # a DataError here says which layouts load
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    with tempfile.TemporaryDirectory(prefix="brainvq-bench-cache-") as temp:
        cache_dir = Path(temp)
        build, sizes = timed_load_all(root, args.seed, cache_dir)  # cold: decodes everything once
        cache_bytes = sum(p.stat().st_size for p in cache_dir.glob("*.npy"))
        repeats = [timed_load_all(root, args.seed, cache_dir)[0] for _ in range(max(1, args.repeats))]
        # What a training step pays on top: the first full-size batch of train from the cached set.
        train = data.load_split(root, "train", args.seed, cache_dir=cache_dir)
        start = time.perf_counter()
        next(data.iter_batches(train.images, 16))
        first_batch = time.perf_counter() - start
        train_is_memmap = isinstance(train.images, np.memmap)
        del train

    totals = [sum(r.values()) for r in repeats]
    median_s = float(np.median(totals))
    build_s = sum(build.values())
    result = {
        "bench": "data_load",
        "data_dir": str(root.resolve()),
        "layout": layout,
        "seed": args.seed,
        "n_train": sizes["train"], "n_val": sizes["val"], "n_test": sizes["test"],
        "cache_mb": round(cache_bytes / 2**20, 1),
        "build_s": round(build_s, 3),
        "build_split_s": {k: round(v, 3) for k, v in build.items()},
        "cached_s": round(median_s, 3),
        "cached_split_s": {k: round(float(np.median([r[k] for r in repeats])), 3) for k in SPLITS},
        "cached_first_s": round(totals[0], 3),
        "cached_repeats_s": [round(t, 3) for t in totals],
        "first_batch_s": round(first_batch, 4),
        "train_images_memmap": train_is_memmap,
        "goal_cached_s": GOAL_CACHED_S,
        "goal_build_s": GOAL_BUILD_S,
        "cached_ok": median_s < GOAL_CACHED_S,
        "build_ok": build_s < GOAL_BUILD_S,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_before": None if load_before is None else round(load_before, 2),
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

"""Do the file names of the Kaggle 4-class set's test folder group its slices into volumes?

    python bench/volumes.py --data-dir ../shared/data/alzheimer4class --json bench/results/volumes.json

Reads "N (k).jpg" as slice N of volume k of its class folder (data.kaggle_position; the train folder's files are
named "nonDem123.jpg" and carry no such field). If that is right, neighbouring slices N and N+1 of one volume
look far more alike than the same two slice numbers taken from two volumes of the same class. SSIM over the
original area, for every adjacent pair in each volume beside the same pair numbers from the next volume of the
class folder (fixed, no sampling).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq import data  # noqa: E402
from brainvq.evaluate import original_boxes  # noqa: E402
from brainvq.io import write_report  # noqa: E402
from brainvq.metrics import ssim  # noqa: E402


def pair_ssims(slices: data.SliceSet) -> dict:
    """Median SSIM of adjacent slices within a volume, and of the same slice numbers across two volumes."""
    volumes: dict[str, dict[int, int]] = defaultdict(dict)
    for index, item in enumerate(slices.items):
        volume, number = data.kaggle_position(item)
        volumes[volume][number] = index
    top, left, height, width = original_boxes(slices)[0]
    crop = (..., slice(top, top + height), slice(left, left + width))

    def score(i: int, j: int) -> float:
        pair = torch.from_numpy(slices.images[[i, j]]).float().div(255)[:, None][crop]
        return float(ssim(pair[:1], pair[1:]))

    names = sorted(volumes)
    same, other = [], []
    for name, following in tqdm(list(zip(names, names[1:])), desc="volume pairs", unit="volume"):
        if name.rsplit("/", 1)[0] != following.rsplit("/", 1)[0]:
            continue  # the next volume is in another class folder
        mine, theirs = volumes[name], volumes[following]
        for n in sorted(mine):
            if n + 1 in mine and n + 1 in theirs:
                same.append(score(mine[n], mine[n + 1]))
                other.append(score(mine[n], theirs[n + 1]))
    sizes = np.array([len(v) for v in volumes.values()])
    return {"volumes": len(volumes), "slices_per_volume_median": float(np.median(sizes)),
            "slice_numbers": sorted({n for v in volumes.values() for n in v}), "pairs": len(same),
            "ssim_adjacent_same_volume_median": float(np.median(same)),
            "ssim_same_numbers_other_volume_median": float(np.median(other))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="the Kaggle 4-class data root")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    test = data.load_split(args.data_dir, "test")
    if any(data.kaggle_position(item) is None for item in test.items):
        raise SystemExit(f"{args.data_dir}'s test folder has files not named 'N (k).jpg' or 'N.jpg' in class "
                         "folders: this benchmark is for the Kaggle 4-class set")
    return write_report({"test": pair_ssims(test)}, args.json)


if __name__ == "__main__":
    main()

"""How good are generated brains? 64 samples at temperature 1.0 from the shipped prior, decoded.

    python bench/generation_quality.py --data-dir ../shared/data/alzheimer4class --json bench/results/generation.json

* realism: mean SSIM of each sample to its nearest training slice (nearest by SSIM among the 16 nearest by
  L2 on 64x64 thumbnails, so the search stays cheap on a CPU);
* diversity: mean pairwise MS-SSIM among the samples, beside the same figure for 64 random real test slices
  (closer to the real figure is better; much higher means collapse);
* whole-brain rate: the fraction of samples whose decoded brain (pixels > 0.1) is one connected component
  (specks < 50 px ignored) with an area inside the 5th-95th percentile of the real training slices' brain
  areas: the distribution the prior was trained to model. For reference: the same rate for the held-out real
  validation slices (drawn from the same folder as train), the fraction of samples that are one component, and
  the brain-area percentiles of samples, real train and real test slices.

Why the band comes from train and not test: on the Kaggle Alzheimer set the test/ folder's brains are ~7%
smaller than the train/ folder's in every class (median 17,180 vs 18,515 px), so a test band rejects most real
training slices too. That rate is reported as well (``..._vs_test_band``), for samples and for real train slices.
Saves a 4x4 gallery of the first 16 samples.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq import data  # noqa: E402
from brainvq.io import write_report  # noqa: E402
from brainvq.metrics import brain_area_range, brain_region_table, ms_ssim, ssim, whole_brain  # noqa: E402
from brainvq.pixelcnn import GatedPixelCNN  # noqa: E402
from brainvq.sampling import sample_codes  # noqa: E402
from brainvq.visualize import save_gallery  # noqa: E402
from brainvq.vqvae import VQVAE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images, 4).flatten(1)


@torch.no_grad()
def nearest_ssim(samples: torch.Tensor, train: np.ndarray, shortlist: int = 16) -> list[float]:
    """SSIM of each sample to its nearest training slice (SSIM-nearest among the L2-nearest thumbnails)."""
    thumbs = torch.cat([thumbnails(b) for b in data.iter_batches(train, 256)])
    distances = torch.cdist(thumbnails(samples), thumbs)
    best = []
    for k, candidates in enumerate(distances.topk(shortlist, largest=False).indices):
        real = next(data.iter_batches(train[np.sort(candidates.numpy())], shortlist))
        best.append(float(ssim(samples[k:k + 1].expand_as(real), real, per_image=True).max()))
    return best


@torch.no_grad()
def mean_pairwise_ms_ssim(images: torch.Tensor) -> float:
    pairs = list(itertools.combinations(range(len(images)), 2))
    scores = []
    for start in range(0, len(pairs), 256):
        a, b = zip(*pairs[start:start + 256])
        scores.append(ms_ssim(images[list(a)], images[list(b)]))
    return float(torch.cat(scores).mean())


def regions_of(images: np.ndarray) -> np.ndarray:
    """The brain-region table (components, area) of real uint8 slices."""
    return brain_region_table(data.iter_batches(images, 256))


def area_percentiles(regions: np.ndarray) -> list[float]:
    return np.percentile(regions[:, 1], [5, 50, 95]).tolist()


def median_area_by_class(split: data.SliceSet, regions: np.ndarray) -> dict[str, float]:
    """Median brain area per class label (image-folder layouts; OASIS slices have no label)."""
    labels = np.array([item.label or "-" for item in split.items])
    return {label: float(np.median(regions[labels == label, 1])) for label in sorted(set(labels))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqvae", default=str(ROOT / "checkpoints/vqvae"))
    p.add_argument("--pixelcnn", default=str(ROOT / "checkpoints/pixelcnn"))
    p.add_argument("--data-dir")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=16, help="grids sampled at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gallery", default=str(ROOT / "docs/samples.png"))
    p.add_argument("--json")
    args = p.parse_args(argv)
    vqvae = VQVAE.from_pretrained(args.vqvae)
    prior = GatedPixelCNN.from_pretrained(args.pixelcnn, vqvae=vqvae)
    samples = torch.cat([vqvae.decode(sample_codes(prior, n=min(args.batch, args.n - start),
                                                   temperature=args.temperature, seed=args.seed + start))
                         for start in range(0, args.n, args.batch)])
    train = data.load_split(args.data_dir, "train", args.seed)
    val = data.load_split(args.data_dir, "val", args.seed)
    test = data.load_split(args.data_dir, "test", args.seed)
    pick = np.sort(np.random.default_rng(args.seed).choice(len(test), size=min(args.n, len(test)), replace=False))
    real_test = next(data.iter_batches(test.images[pick], len(pick)))
    sampled = brain_region_table([samples])
    train_regions, test_regions = regions_of(train.images), regions_of(test.images)
    band, test_band = brain_area_range(train_regions), brain_area_range(test_regions)

    save_gallery(samples[:16], Path(args.gallery),
                 title=f"16 BrainVQ samples, temperature {args.temperature}, seed {args.seed}")
    result = {"n_samples": args.n, "temperature": args.temperature,
              "realism_nn_ssim_mean": float(np.mean(nearest_ssim(samples, train.images))),
              "diversity_ms_ssim_samples": mean_pairwise_ms_ssim(samples),
              "diversity_ms_ssim_real_test": mean_pairwise_ms_ssim(real_test),
              "whole_brain_rate": float(whole_brain(sampled, band).mean()),
              "whole_brain_rate_real_val": float(whole_brain(regions_of(val.images), band).mean()),
              "brain_area_band": "real train slices, 5th-95th percentile",
              "brain_area_p5_p95": list(band),
              "single_component_rate": float((sampled[:, 0] == 1).mean()),
              "area_p5_p50_p95": {"samples": area_percentiles(sampled), "real_train": area_percentiles(train_regions),
                                  "real_test": area_percentiles(test_regions)},
              "median_area_by_class": {"real_train": median_area_by_class(train, train_regions),
                                       "real_test": median_area_by_class(test, test_regions)},
              "test_brain_area_p5_p95": list(test_band),
              "whole_brain_rate_vs_test_band": float(whole_brain(sampled, test_band).mean()),
              "whole_brain_rate_real_train_vs_test_band": float(whole_brain(train_regions, test_band).mean()),
              "goal_whole_brain_rate": 0.9, "gallery": os.path.relpath(args.gallery, ROOT)}
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

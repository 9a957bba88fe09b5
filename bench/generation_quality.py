"""How real do generated brains look? Every figure beside the same figure for real slices, measured the same way.

    python bench/generation_quality.py --data-dir ../shared/data/alzheimer4class --json bench/results/generation.json

Samples N grids from the prior at its default sampling settings (``"sampling"`` in the prior's config.json;
override with --temperature/--top-k/--top-p) and decodes them. Real reference: 2N slices of the ``--reference``
split (train for the report, val for choosing settings), drawn once with REAL_PICK_SEED and cut into two
disjoint halves A and B. Everything is measured inside the original image area (the 176x208 box of the Kaggle
slices), not the black padding:

* ``c2st_accuracy``: k-fold held-out accuracy of a small CNN trained from scratch on samples vs real A
  (brainvq.realism; 0.5 = indistinguishable). Controls, same protocol: ``c2st_accuracy_real_vs_real`` (B vs A,
  should be ~0.5) and ``c2st_accuracy_recon_vs_real`` (the VQ-VAE's reconstructions of B vs A: the floor a
  perfect prior could reach with this decoder).
* texture: median in-brain |Laplacian| (mottling raises it) and the in-brain intensity Wasserstein-1 distance to
  A, for samples, real B and reconstructions of B.
* ``nn_ssim``: SSIM of each image to its nearest training slice, for samples beside held-out real val and test
  slices (val leaks subjects from train, so its figure is high; test's brains are ~7% smaller).
* diversity: mean pairwise MS-SSIM of 64 samples beside 64 real slices of A (higher = more alike).
* whole-brain rate (one component, area inside the real train slices' 5th-95th percentile): samples beside real
  val slices. About 90% of real slices pass by construction, so it is a sanity check, not a goal.

``--seed`` seeds the sampling only; the split has its own ``--split-seed``. Saves a gallery: 8 samples above
8 real slices of A.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq import data  # noqa: E402
from brainvq.io import write_report  # noqa: E402
from brainvq.metrics import brain_area_range, brain_region_table, ms_ssim, ssim, whole_brain  # noqa: E402
from brainvq.pixelcnn import GatedPixelCNN  # noqa: E402
from brainvq.realism import c2st_accuracy, texture_report  # noqa: E402
from brainvq.sampling import default_settings, sample_codes  # noqa: E402
from brainvq.visualize import save_gallery  # noqa: E402
from brainvq.vqvae import VQVAE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL_PICK_SEED = 0   # which real slices form the reference halves A and B
C2ST_SEED = 0        # folds, initialisations and batch order of the two-sample test classifiers


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images, 4).flatten(1)


@torch.no_grad()
def nearest_ssim(images: torch.Tensor, train: torch.Tensor, shortlist: int = 16) -> list[float]:
    """SSIM of each image to its nearest training image (SSIM-nearest among the 16 L2-nearest thumbnails)."""
    thumbs = thumbnails(train)
    best = []
    for image, candidates in zip(images, torch.cdist(thumbnails(images), thumbs).topk(shortlist, largest=False).indices):
        real = train[candidates]
        best.append(float(ssim(image.expand_as(real), real, per_image=True).max()))
    return best


@torch.no_grad()
def mean_pairwise_ms_ssim(images: torch.Tensor) -> float:
    pairs = list(itertools.combinations(range(len(images)), 2))
    scores = [ms_ssim(images[list(a)], images[list(b)]) for a, b in
              (zip(*pairs[start:start + 256]) for start in range(0, len(pairs), 256))]
    return float(torch.cat(scores).mean())


def as_float(images: np.ndarray) -> torch.Tensor:
    return torch.cat(list(data.iter_batches(images, 256)))


@torch.no_grad()
def reconstruct(vqvae: VQVAE, images: torch.Tensor) -> torch.Tensor:
    """The VQ-VAE's reconstructions of (N,1,H,W) images, 32 at a time, clamped to [0,1]."""
    return torch.cat([vqvae.decode(vqvae.encode(batch)).clamp(0, 1) for batch in images.split(32)])


def original_area(split: data.SliceSet) -> tuple[slice, slice]:
    """The padded-frame box that holds every image's own pixels (the union of their boxes)."""
    from brainvq.evaluate import original_boxes

    boxes = np.array(original_boxes(split))
    top, left = boxes[:, 0].min(), boxes[:, 1].min()
    bottom, right = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
    return slice(int(top), int(bottom)), slice(int(left), int(right))


@torch.no_grad()
def draw_samples(vqvae: VQVAE, prior: GatedPixelCNN, n: int, batch: int, seed: int, settings: dict) -> torch.Tensor:
    """n decoded samples; batch b uses seed ``seed + b`` (so a rerun with the same seed is identical)."""
    out = []
    for start in tqdm(range(0, n, batch), desc="sampling", unit="batch"):
        codes = sample_codes(prior, n=min(batch, n - start), seed=seed + start, **settings)
        out.append(vqvae.decode(codes).clamp(0, 1))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqvae", default=str(ROOT / "checkpoints/vqvae"))
    p.add_argument("--pixelcnn", default=str(ROOT / "checkpoints/pixelcnn"))
    p.add_argument("--data-dir")
    p.add_argument("--n", type=int, default=256, help="samples, and real slices in each reference half")
    p.add_argument("--temperature", type=float, help="default: the prior's config")
    p.add_argument("--top-k", type=int, help="default: the prior's config (0 = off)")
    p.add_argument("--top-p", type=float, help="default: the prior's config (1 = off)")
    p.add_argument("--reference", choices=("train", "val"), default="train",
                   help="real split to compare with: train to report, val to choose sampling settings")
    p.add_argument("--batch", type=int, default=16, help="grids sampled at once")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--split-seed", type=int, default=0, help="train/val split seed")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--c2st-steps", type=int, default=300, help="Adam steps of each fold's classifier")
    p.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the real-vs-real and reconstruction controls (off when sweeping settings)")
    p.add_argument("--gallery", default=str(ROOT / "docs/samples.png"))
    p.add_argument("--json")
    args = p.parse_args(argv)
    vqvae = VQVAE.from_pretrained(args.vqvae)
    prior = GatedPixelCNN.from_pretrained(args.pixelcnn, vqvae=vqvae)
    settings = default_settings(prior)
    for key in ("temperature", "top_k", "top_p"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)

    splits = {name: data.load_split(args.data_dir, name, args.split_seed) for name in ("train", "val", "test")}
    rows, cols = original_area(splits[args.reference])
    crop = (..., rows, cols)
    reference = splits[args.reference]
    if len(reference) < 2 * args.n:
        raise SystemExit(f"--n {args.n} needs {2 * args.n} real {args.reference} slices, the split has {len(reference)}")
    pick = np.random.default_rng(REAL_PICK_SEED).choice(len(reference), size=2 * args.n, replace=False)
    real_a, real_b = as_float(reference.images[np.sort(pick[:args.n])]), as_float(reference.images[np.sort(pick[args.n:])])

    started = time.time()
    samples = draw_samples(vqvae, prior, args.n, args.batch, args.seed, settings)
    sampling_s = time.time() - started
    two_sample = lambda a, b: c2st_accuracy(a[crop], b[crop], args.folds, args.c2st_steps, C2ST_SEED)  # noqa: E731
    result: dict = {"n": args.n, "sampling": settings, "seed": args.seed, "split_seed": args.split_seed,
                    "real_pick_seed": REAL_PICK_SEED, "c2st_seed": C2ST_SEED, "reference": args.reference,
                    "area": f"rows {rows.start}-{rows.stop}, columns {cols.start}-{cols.stop} of the padded frame",
                    "sampling_seconds": sampling_s}
    print("two-sample test: samples vs real", flush=True)
    result["c2st_accuracy"] = two_sample(samples, real_a)
    result["texture_samples"] = texture_report(samples[crop], real_a[crop])
    if args.controls:
        recon = reconstruct(vqvae, real_b)
        print("two-sample test controls: real vs real, reconstructions vs real", flush=True)
        result["c2st_accuracy_real_vs_real"] = two_sample(real_b, real_a)
        result["c2st_accuracy_recon_vs_real"] = two_sample(recon, real_a)
        result["texture_real"] = texture_report(real_b[crop], real_a[crop])
        result["texture_recon"] = texture_report(recon[crop], real_a[crop])

        train = as_float(splits["train"].images)[crop]
        held_out = {name: as_float(splits[name].images[np.sort(np.random.default_rng(REAL_PICK_SEED).choice(
            len(splits[name]), size=min(args.n, len(splits[name])), replace=False))])[crop] for name in ("val", "test")}
        result["nn_ssim_median"] = {"samples": float(np.median(nearest_ssim(samples[crop], train))),
                                    **{f"real_{k}": float(np.median(nearest_ssim(v, train))) for k, v in held_out.items()}}
        result["diversity_ms_ssim"] = {"samples": mean_pairwise_ms_ssim(samples[:64][crop]),
                                       "real_train": mean_pairwise_ms_ssim(real_a[:64][crop])}
        band = brain_area_range(brain_region_table(data.iter_batches(splits["train"].images, 256)))
        result["whole_brain_rate"] = {
            "samples": float(whole_brain(brain_region_table([samples]), band).mean()),
            "real_val": float(whole_brain(brain_region_table(data.iter_batches(splits["val"].images, 256)), band).mean()),
            "band": "one component, area inside the real train slices' 5th-95th percentile", "area_band": list(band)}
        save_gallery(torch.cat([samples[:8], real_a[:8]]), Path(args.gallery),
                     title=f"top: 8 samples ({', '.join(f'{k}={v}' for k, v in settings.items())}, seed {args.seed}); "
                           f"bottom: 8 real {args.reference} slices")
        result["gallery"] = os.path.relpath(args.gallery, ROOT)
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

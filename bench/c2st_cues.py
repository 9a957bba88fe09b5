"""What does the two-sample test's classifier key on? Its accuracy on real and decoded slices after one controlled
change each, to tell which cue sets the decoder's floor (reconstructions are told from real 94% of the time).

    python bench/c2st_cues.py --data-dir ../shared/data/alzheimer4class --json bench/results/c2st_cues.json

Same protocol, seeds and reference as bench/generation_quality.py (256 images against real train half A, inside
the original area), so its rows sit beside that script's c2st_accuracy_real_vs_real (real half B)
and ..._recon_vs_real (reconstructions of B). A third set C of 256 other real train slices supplies texture.
Each row is one change:

* ``real_blur07``: B blurred by a Gaussian of sigma 0.7 px: how much does sharpness alone give away?
* ``recon_jpeg75``: reconstructions of B through one JPEG round trip at quality 75: is the floor the codec's
  missing artifacts?
* ``recon_plus_real_residual``: reconstructions of B plus the in-brain residual (x - recon) of the slices of C:
  real fine texture, from other anatomy;
* ``recon_plus_gaussian_texture``: reconstructions of B plus stationary Gaussian texture fitted on C's residuals
  (their in-brain power spectrum, and their spread per reconstructed intensity).

The codec is quality 75 because the Kaggle files' quantization tables are IJG quality 75's.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import generation_quality  # noqa: E402

from brainvq import anomaly, data  # noqa: E402
from brainvq.io import write_report  # noqa: E402
from brainvq.realism import brain_masks, c2st_accuracy, texture_report  # noqa: E402
from brainvq.vqvae import VQVAE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTURE_SEED = 0   # the white noise of the Gaussian texture
PATCH = 32         # side of the residual patches whose power spectrum shapes the Gaussian texture
BINS = 16          # reconstructed-intensity bins of the texture's spread


def jpeg_round_trip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """(N,1,H,W) in [0,1] -> the same images saved as 8-bit JPEGs at ``quality`` and read back."""
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray((image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(buffer, "JPEG",
                                                                                              quality=quality)
        out.append(torch.from_numpy(np.asarray(Image.open(buffer), dtype=np.float32) / 255))
    return torch.stack(out).unsqueeze(1)


class GaussianTexture:
    """Stationary Gaussian texture fitted to in-brain residuals: white noise shaped by their mean power spectrum
    over PATCH x PATCH patches inside the brain, scaled by their standard deviation per reconstructed intensity."""

    def __init__(self, residuals: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor):
        self.edges = torch.linspace(0, 1, BINS + 1)[1:-1]
        bins = torch.bucketize(recon[mask], self.edges)
        self.spread = torch.stack([residuals[mask][bins == b].std() if (bins == b).sum() > 100 else torch.tensor(0.0)
                                   for b in range(BINS)])
        whitened = residuals / self.spread[torch.bucketize(recon, self.edges)].clamp_min(1e-3)
        patches = F.unfold(whitened, PATCH, stride=PATCH // 2).transpose(1, 2).reshape(-1, PATCH, PATCH)
        inside = F.unfold(mask.float(), PATCH, stride=PATCH // 2).transpose(1, 2).reshape(-1, PATCH, PATCH)
        power = (torch.fft.fft2(patches[inside.amin((1, 2)) > 0]).abs() ** 2).mean(0)
        kernel = torch.fft.fftshift(torch.fft.ifft2(power.sqrt()).real)
        self.kernel = (kernel / kernel.pow(2).sum().sqrt()).view(1, 1, PATCH, PATCH)

    def add_to(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        white = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        noise = F.conv2d(F.pad(white, (PATCH // 2, PATCH // 2 - 1) * 2, mode="reflect"), self.kernel)
        spread = self.spread[torch.bucketize(images, self.edges)]
        return (images + noise * spread * brain_masks(images, erode=0)).clamp(0, 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqvae", default=str(ROOT / "checkpoints/vqvae"))
    p.add_argument("--data-dir")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--c2st-steps", type=int, default=300)
    p.add_argument("--json")
    args = p.parse_args(argv)
    vqvae = VQVAE.from_pretrained(args.vqvae)
    train = data.load_split(args.data_dir, "train", args.split_seed)
    if len(train) < 3 * args.n:
        raise SystemExit(f"--n {args.n} needs {3 * args.n} real train slices, the split has {len(train)}")
    rows, cols = generation_quality.original_area(train)
    crop = (..., rows, cols)
    # A and B: generation_quality's halves (the same draw); C: drawn from the remaining slices
    rng = np.random.default_rng(generation_quality.REAL_PICK_SEED)
    pick = rng.choice(len(train), size=2 * args.n, replace=False)
    rest = rng.choice(np.setdiff1d(np.arange(len(train)), pick), size=args.n, replace=False)
    real_a, real_b, real_c = (generation_quality.as_float(train.images[np.sort(part)])
                              for part in (pick[:args.n], pick[args.n:], rest))
    recon_b, recon_c = (generation_quality.reconstruct(vqvae, images)[crop] for images in (real_b, real_c))
    real_a, real_b, real_c = real_a[crop], real_b[crop], real_c[crop]
    mask_c = brain_masks(real_c, erode=2) & brain_masks(recon_c, erode=2)
    residual_c = (real_c - recon_c) * mask_c
    texture = GaussianTexture(real_c - recon_c, recon_c, mask_c)

    variants = {"real_blur07": lambda: torch.from_numpy(anomaly.smooth(real_b[:, 0].numpy(), 0.7))[:, None],
                "recon_jpeg75": lambda: jpeg_round_trip(recon_b, 75),
                "recon_plus_real_residual": lambda: (recon_b + residual_c * brain_masks(recon_b, erode=2)).clamp(0, 1),
                "recon_plus_gaussian_texture": lambda: texture.add_to(recon_b, TEXTURE_SEED)}
    result: dict = {"n": args.n, "split_seed": args.split_seed,
                    "real_pick_seed": generation_quality.REAL_PICK_SEED, "c2st_seed": generation_quality.C2ST_SEED,
                    "texture_seed": TEXTURE_SEED, "reference": "train half A",
                    "area": f"rows {rows.start}-{rows.stop}, columns {cols.start}-{cols.stop} of the padded frame",
                    "c2st_accuracy": {}, "texture": {}}
    for name, make in tqdm(variants.items(), desc="two-sample tests", unit="test"):
        images = make()
        result["c2st_accuracy"][name] = c2st_accuracy(images, real_a, args.folds, args.c2st_steps,
                                                      generation_quality.C2ST_SEED)
        result["texture"][name] = texture_report(images, real_a)
        tqdm.write(f"{name}: {result['c2st_accuracy'][name]:.3f}")
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

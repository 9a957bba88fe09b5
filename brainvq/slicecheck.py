"""Does an image look like an axial brain slice of the kind the models know? Judged by the models themselves.

Features of a 256x256 slice (float, [0,1]):

  bits          the prior's mean NLL per code over the whole grid (likelihood);
  brain_bits    the same over the brain's codes;
  ssim_brain    SSIM of the VQ-VAE reconstruction over the brain's bounding box (reconstruction);
  area          brain pixels (brainvq.lesions.brain_mask: the largest bright region, holes filled);
  aspect        the brain's bounding-box height / width (axial brains are taller than wide);
  solidity      brain area / its convex hull's area (a brain is a compact oval);
  offset        distance in pixels from the brain's centroid to the frame's centre;
  outside       share of the pixels outside the brain that are not black (photos, text, noise).

A slice passes when every feature lies inside limits set on validation slices (``fit_limits``): the range from
their 0.5th to their 99.5th percentile, widened on each side by its own width. Validation slices share subjects
with the training slices, so their spread understates that of new subjects: with limits at half that widening
a probe flagged 52% of the (shifted) test slices, mostly for brain area. Limits are stored with the fingerprints of
the models they were measured with (``checkpoints/anomaly/slice_check.json``, written by bench/slice_check.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.spatial import ConvexHull

from brainvq.anomaly import ANOMALY_DIR, model_fingerprints
from brainvq.io import atomic_write_json
from brainvq.lesions import BRAIN_LEVEL, brain_mask
from brainvq.metrics import ssim
from brainvq.pixelcnn import code_nll

FEATURES = ("bits", "brain_bits", "ssim_brain", "area", "aspect", "solidity", "offset", "outside")
LIMITS_NAME = "slice_check.json"
MIN_BRAIN = 500          # pixels: less than this is no brain at all
LOW_Q, HIGH_Q, WIDEN = 0.5, 99.5, 1.0


def brain_box(brain: np.ndarray) -> tuple[slice, slice]:
    """The bounding box of a non-empty mask, as slices."""
    rows, cols = np.flatnonzero(brain.any(1)), np.flatnonzero(brain.any(0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def ssim_in_box(recon: torch.Tensor, image: torch.Tensor, brain: np.ndarray) -> float | None:
    """SSIM of (1,1,H,W) images over the brain's bounding box (None when there is no box of 11x11 pixels)."""
    if brain.sum() == 0:
        return None
    rows, cols = brain_box(brain)
    if rows.stop - rows.start < 11 or cols.stop - cols.start < 11:
        return None
    return float(ssim(recon[..., rows, cols], image[..., rows, cols]))


@torch.no_grad()
def features(vqvae, prior, images: np.ndarray, encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
             brains: Sequence[np.ndarray] | None = None) -> list[dict[str, float | None]]:
    """The features of each float (256,256) slice of a batch; shape features are None without a brain.
    ``encoded``: the slices' (B,h,w) codes and (B,1,H,W) reconstruction, ``brains`` their ``brain_mask``s, when the
    caller has them already."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None]
    if encoded is None:
        codes = vqvae.encode(x)
        encoded = codes, vqvae.decode(codes).clamp(0, 1).float()
    codes, recon = (t.cpu() for t in encoded)
    nll = code_nll(prior(codes), codes) / np.log(2)
    grid = codes.shape[-1]
    out = []
    for k, image in enumerate(np.asarray(images, dtype=np.float32)):
        brain = brain_mask(image) if brains is None else brains[k]
        f: dict[str, float | None] = dict.fromkeys(FEATURES)
        f["bits"], f["area"] = float(nll[k].mean()), float(brain.sum())
        f["ssim_brain"] = ssim_in_box(recon[k:k + 1], x[k:k + 1], brain)
        if brain.sum() >= MIN_BRAIN:
            patch = image.shape[-1] // grid
            on_codes = torch.from_numpy(brain.reshape(grid, patch, grid, patch).any((1, 3)))
            rows, cols = brain_box(brain)
            ys, xs = np.nonzero(brain)
            f.update(brain_bits=float(nll[k][on_codes].mean()),
                     aspect=(rows.stop - rows.start) / (cols.stop - cols.start),
                     solidity=float(brain.sum() / ConvexHull(np.c_[ys, xs]).volume),
                     offset=float(np.hypot(ys.mean() - (image.shape[0] - 1) / 2, xs.mean() - (image.shape[1] - 1) / 2)),
                     outside=float((image[~brain] > BRAIN_LEVEL).mean()) if (~brain).any() else 0.0)
        out.append(f)
    return out


@dataclass
class Limits:
    """Per-feature (low, high) limits and the models they were measured with."""

    limits: dict[str, tuple[float, float]]
    models: dict[str, str]
    notes: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Limits":
        raw = json.loads(Path(path).read_text())
        return cls({k: tuple(v) for k, v in raw["limits"].items()}, raw["models"], raw.get("notes", {}))


def limits_for(folder: Path | None, vqvae, prior) -> tuple[Limits | None, str | None]:
    """The limits in ``folder``/anomaly/ when they were measured on these models; else None and why not."""
    path = Path(folder) / ANOMALY_DIR / LIMITS_NAME if folder is not None else None
    if path is None or not path.is_file():
        return None, ("the upload check has no limits for these models (run `python bench/slice_check.py "
                      "--checkpoints FOLDER --data-dir DATA` to set them on validation slices, then reload the "
                      "models)")
    return read_limits(path, vqvae, prior)


def read_limits(path: Path, vqvae, prior) -> tuple[Limits | None, str | None]:
    """The limits in the file ``path`` when they were measured on these models; else None and why not."""
    try:
        limits = Limits.load(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"the upload check's limits in {path} are unreadable ({error})"
    if limits.models != model_fingerprints(vqvae, prior):
        return None, "the upload check's limits were measured on other models"
    return limits, None


def fit_limits(rows: list[dict[str, float | None]]) -> dict[str, tuple[float, float]]:
    """Each feature's validation 0.5th-99.5th percentile range, widened on each side by ``WIDEN`` times its width."""
    out = {}
    for name in FEATURES:
        values = np.array([r[name] for r in rows if r[name] is not None], dtype=np.float64)
        low, high = np.percentile(values, [LOW_Q, HIGH_Q])
        out[name] = (float(low - WIDEN * (high - low)), float(high + WIDEN * (high - low)))
    return out


@dataclass
class Verdict:
    """Whether a slice looks like the axial brain slices the models know, and why not."""

    ok: bool
    reasons: list[str]                     # one sentence per failed feature, for the user
    features: dict[str, float | None]
    failed: list[str]                      # the failed features ("no brain" when there is none)


WHY = {"bits": "the prior finds its codes unlikely ({v:.2f} bits/code; brain slices {lo:.2f}-{hi:.2f})",
       "brain_bits": "the prior finds the brain's codes unlikely ({v:.2f} bits/code; brain slices {lo:.2f}-{hi:.2f})",
       "ssim_brain": "the VQ-VAE reconstructs the brain poorly (SSIM {v:.3f} over the brain; brain slices {lo:.3f}-{hi:.3f})",
       "area": "its bright region is {size} for a brain slice ({v:,.0f} pixels; brain slices {lo:,.0f}-{hi:,.0f})",
       "aspect": "its outline has the wrong proportions for an axial slice (height/width {v:.2f}; brain slices {lo:.2f}-{hi:.2f})",
       "solidity": "its outline is not the compact oval of an axial slice (solidity {v:.2f}; brain slices {lo:.2f}-{hi:.2f})",
       "offset": "the brain is off centre ({v:.0f} pixels; brain slices up to {hi:.0f})",
       "outside": "it has content outside the brain ({v:.0%} of the background is not black; brain slices up to {hi:.1%})"}


def judge(row: dict[str, float | None], limits: dict[str, tuple[float, float]]) -> Verdict:
    """A slice passes when every feature is inside its limits; a slice without a brain fails outright."""
    if row["area"] is not None and row["area"] < MIN_BRAIN:
        return Verdict(False, [f"no brain found: only {row['area']:,.0f} pixels are brighter than the background"],
                       row, ["no brain"])
    reasons, failed = [], []
    for name in FEATURES:
        v = row[name]
        lo, hi = limits[name]
        if v is None or lo <= v <= hi:
            continue
        reasons.append(WHY[name].format(v=v, lo=lo, hi=hi, size="too small" if v < lo else "too large"))
        failed.append(name)
    return Verdict(not reasons, reasons, row, failed)

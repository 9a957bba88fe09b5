"""Image and code metrics. SSIM has one definition everywhere: data_range=1, 11x11 Gaussian window, sigma 1.5."""
from __future__ import annotations

import math

import numpy as np
import torch
from pytorch_msssim import ms_ssim as _ms_ssim
from pytorch_msssim import ssim as _ssim

SSIM_KW = dict(data_range=1.0, win_size=11, win_sigma=1.5)


def ssim(x: torch.Tensor, y: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """SSIM of (B,1,H,W) images in [0,1]: the batch mean, or one value per image."""
    return _ssim(x, y, size_average=not per_image, **SSIM_KW)


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image MS-SSIM (images must be at least 161 px a side for the default 5 scales)."""
    return _ms_ssim(x, y, size_average=False, **SSIM_KW)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0,1]; identical images are capped at 100 dB."""
    mse = (x - y).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp_max(100.0)


def code_histogram(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Counts of each code index in a tensor of codes."""
    return torch.bincount(codes.flatten().long(), minlength=num_codes)


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a code histogram: the effective number of codes in use."""
    p = counts.double() / counts.sum().clamp_min(1)
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


def entropy_bits(counts: torch.Tensor) -> float:
    """Entropy in bits of a code histogram: the unigram baseline for bits per code."""
    return math.log2(perplexity(counts))


def nats_to_bits(nll: float) -> float:
    return nll / math.log(2)


BRAIN_THRESHOLD = 0.1     # pixels brighter than this (in [0,1]) count as brain
MIN_COMPONENT = 50        # connected specks smaller than this many pixels are ignored


def brain_regions(image: torch.Tensor) -> tuple[int, int]:
    """(number of connected brain components of at least MIN_COMPONENT pixels, total brain area in pixels)."""
    from scipy import ndimage

    mask = image.detach().cpu().squeeze().numpy() > BRAIN_THRESHOLD
    labels, count = ndimage.label(mask)
    sizes = ndimage.sum_labels(mask, labels, range(1, count + 1)) if count else []
    return int(sum(size >= MIN_COMPONENT for size in sizes)), int(mask.sum())


def brain_region_table(batches) -> np.ndarray:
    """``brain_regions`` of every image in an iterable of image batches, as an N x 2 array (components, area)."""
    return np.array([brain_regions(image) for batch in batches for image in batch], dtype=np.int64).reshape(-1, 2)


def brain_area_range(regions: np.ndarray, low: float = 5, high: float = 95) -> tuple[float, float]:
    """The (low, high) percentiles of brain area in real slices' region table: the band a whole brain must hit."""
    return float(np.percentile(regions[:, 1], low)), float(np.percentile(regions[:, 1], high))


def whole_brain(regions: np.ndarray, area_range: tuple[float, float]) -> np.ndarray:
    """Per row of a region table: one connected brain component whose area lies inside ``area_range``."""
    low, high = area_range
    return (regions[:, 0] == 1) & (regions[:, 1] >= low) & (regions[:, 1] <= high)


# ----------------------------------------------------------------------------- detection (anomaly maps)


def _ranked_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives at every distinct threshold, from the highest score down (ties kept together)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    ranked, hits = np.asarray(scores)[order], np.asarray(labels, dtype=bool)[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tp = np.cumsum(hits)[last_of_tie]
    return tp, last_of_tie + 1 - tp


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as a step sum, sum_n (R_n - R_n-1) P_n (as scikit-learn defines it)."""
    tp, fp = _ranked_counts(scores, labels)
    if tp[-1] == 0:
        return float("nan")
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * tp / (tp + fp)))


def best_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The highest Dice over all thresholds of ``scores``, and the threshold that reaches it."""
    tp, fp = _ranked_counts(scores, labels)
    dice = 2 * tp / (tp[-1] + tp + fp)
    best = int(np.argmax(dice))
    return float(dice[best]), float(np.sort(np.asarray(scores, dtype=np.float64))[::-1][tp[best] + fp[best] - 1])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a positive outscores a negative (ties count one half)."""
    from scipy.stats import rankdata

    labels = np.asarray(labels, dtype=bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))

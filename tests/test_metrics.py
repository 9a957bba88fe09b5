"""brainvq.metrics: SSIM/PSNR on images, perplexity/entropy on code histograms, whole-brain checks on masks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_msssim
import torch
import torch.nn.functional as F

from brainvq import metrics


def _images(seed: int, n: int = 3, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g)


def _reference_ssim(x: torch.Tensor, y: torch.Tensor, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Wang et al. 2004 SSIM written out independently: 2-D Gaussian window, valid borders, K1=.01, K2=.03, L=1."""
    coords = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]
    x, y = x.double(), y.double()
    mu_x, mu_y = F.conv2d(x, kernel), F.conv2d(y, kernel)
    var_x = F.conv2d(x * x, kernel) - mu_x ** 2
    var_y = F.conv2d(y * y, kernel) - mu_y ** 2
    cov = F.conv2d(x * y, kernel) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def test_ssim_of_identical_images_is_one():
    x = _images(0)
    assert float(metrics.ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(metrics.ssim(x, x, per_image=True), torch.ones(len(x)), atol=1e-6)


def test_ssim_per_image_shape_and_mean():
    x, y = _images(0), _images(1)
    per = metrics.ssim(x, y, per_image=True)
    assert per.shape == (3,)
    assert float(metrics.ssim(x, y)) == pytest.approx(float(per.mean()), abs=1e-6)
    assert float(metrics.ssim(x, y)) < 0.2  # independent noise images are nearly unrelated


def test_ssim_matches_pytorch_msssim_with_the_documented_settings():
    x = _images(2)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    expected = pytorch_msssim.ssim(x, y, data_range=1.0, win_size=11, win_sigma=1.5, size_average=False)
    assert torch.allclose(metrics.ssim(x, y, per_image=True), expected, atol=1e-6)
    assert metrics.SSIM_KW == {"data_range": 1.0, "win_size": 11, "win_sigma": 1.5}


def test_ssim_matches_an_independent_implementation():
    x = _images(4)
    y = (0.7 * x + 0.3 * _images(5)).clamp(0, 1)
    ours = metrics.ssim(x, y, per_image=True).double()
    assert torch.allclose(ours, _reference_ssim(x, y), atol=1e-5)


def test_psnr_values_and_cap():
    x = _images(6, n=2)
    capped = metrics.psnr(x, x)
    assert capped.shape == (2,)
    assert torch.all(capped == 100.0)
    y = (x + 0.1).clamp(max=10.0)  # uniform error 0.1 -> mse 0.01 -> 20 dB
    assert torch.allclose(metrics.psnr(x, y), torch.full((2,), 20.0), atol=1e-3)
    assert torch.all(metrics.psnr(x, (x + 1e-7)) <= 100.0)


@pytest.mark.parametrize("k", [1, 2, 16, 512])
def test_perplexity_of_uniform_histogram_is_k(k):
    counts = torch.full((k,), 7, dtype=torch.long)
    assert metrics.perplexity(counts) == pytest.approx(k, rel=1e-9)
    assert metrics.entropy_bits(counts) == pytest.approx(math.log2(k), abs=1e-9)


def test_perplexity_ignores_unused_codes_and_handles_empty():
    counts = torch.tensor([5, 0, 5, 0])
    assert metrics.perplexity(counts) == pytest.approx(2.0)
    assert metrics.entropy_bits(counts) == pytest.approx(1.0)
    assert metrics.perplexity(torch.zeros(8, dtype=torch.long)) == pytest.approx(1.0)


def test_entropy_bits_of_skewed_histogram():
    counts = torch.tensor([2, 1, 1])  # p = 1/2, 1/4, 1/4 -> 1.5 bits
    assert metrics.entropy_bits(counts) == pytest.approx(1.5, abs=1e-9)
    assert metrics.perplexity(counts) == pytest.approx(2 ** 1.5, rel=1e-9)


def test_code_histogram_and_nats_to_bits():
    codes = torch.tensor([[0, 1], [1, 3]])
    assert metrics.code_histogram(codes, 5).tolist() == [1, 2, 0, 1, 0]
    assert metrics.nats_to_bits(math.log(2)) == pytest.approx(1.0)


def _discs(*specs: tuple[int, int, int], size: int = 64) -> torch.Tensor:
    """One 1xHxW image with a bright disc of radius r at (row, col) for each (row, col, r)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.zeros(1, size, size)
    for row, col, r in specs:
        image[0][(yy - row) ** 2 + (xx - col) ** 2 <= r * r] = 0.8
    return image


def test_brain_regions_counts_components_and_ignores_specks():
    one = _discs((32, 32, 12))
    two = _discs((16, 16, 8), (48, 48, 8))
    speck = _discs((32, 32, 12), (3, 3, 2))          # 13 px: below MIN_COMPONENT, still counted in the area
    assert metrics.brain_regions(one) == (1, int((one > metrics.BRAIN_THRESHOLD).sum()))
    assert metrics.brain_regions(two)[0] == 2
    assert metrics.brain_regions(speck)[0] == 1
    assert metrics.brain_regions(speck)[1] == metrics.brain_regions(one)[1] + 13
    assert metrics.brain_regions(torch.zeros(1, 64, 64)) == (0, 0)


def test_whole_brain_needs_one_component_inside_the_area_band():
    images = torch.stack([_discs((32, 32, r)) for r in (8, 10, 12, 14)] + [_discs((16, 16, 8), (48, 48, 8))])
    regions = metrics.brain_region_table([images])
    band = metrics.brain_area_range(regions[:4], low=25, high=75)
    assert band[0] < band[1]
    assert metrics.whole_brain(regions, band).tolist() == [False, True, True, False, False]
    assert metrics.brain_region_table([images[:2], images[2:4]]).tolist() == [
        list(metrics.brain_regions(image)) for image in images[:4]]
    assert metrics.brain_region_table([]).shape == (0, 2)


# ----------------------------------------------------------------------------- detection metrics


def _brute_force(scores, labels):
    """AP, best Dice and AUROC straight from their definitions, one threshold at a time."""
    thresholds = sorted(set(scores), reverse=True)
    positives = sum(labels)
    ap, previous_recall, dice = 0.0, 0.0, 0.0
    for t in thresholds:
        tp = sum(1 for s, y in zip(scores, labels) if s >= t and y)
        fp = sum(1 for s, y in zip(scores, labels) if s >= t and not y)
        ap += (tp / positives - previous_recall) * tp / (tp + fp)
        previous_recall = tp / positives
        dice = max(dice, 2 * tp / (positives + tp + fp))
    pairs = [(p, n) for p, yp in zip(scores, labels) if yp for n, yn in zip(scores, labels) if not yn]
    auc = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    return ap, dice, auc


@pytest.mark.parametrize("seed", range(5))
def test_detection_metrics_match_their_definitions_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40).astype(float)  # few distinct values: many ties
    labels = rng.random(40) < 0.3
    ap, dice, auc = _brute_force(list(scores), list(labels))
    assert metrics.average_precision(scores, labels) == pytest.approx(ap)
    assert metrics.best_dice(scores, labels)[0] == pytest.approx(dice)
    assert metrics.auroc(scores, labels) == pytest.approx(auc)


def test_detection_metrics_extremes():
    labels = np.array([0, 0, 1, 1], dtype=bool)
    assert metrics.average_precision(np.array([0.1, 0.2, 0.8, 0.9]), labels) == pytest.approx(1.0)
    assert metrics.auroc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == pytest.approx(1.0)
    assert metrics.auroc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == pytest.approx(0.0)
    assert metrics.best_dice(np.array([0.1, 0.2, 0.8, 0.9]), labels) == (pytest.approx(1.0), pytest.approx(0.8))
    assert math.isnan(metrics.average_precision(np.ones(3), np.zeros(3, dtype=bool)))
    assert math.isnan(metrics.auroc(np.ones(3), np.ones(3, dtype=bool)))

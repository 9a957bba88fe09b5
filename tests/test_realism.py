"""The realism measures of bench/generation_quality.py: the classifier two-sample test and texture statistics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from brainvq.realism import c2st_accuracy, intensity_distance, laplacian_in_brain


def discs(n: int, seed: int, noise: float = 0.0, size: int = 32) -> torch.Tensor:
    """Bright discs of random radius and brightness on black, with optional per-pixel noise inside (mottling)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = 8 + 6 * torch.rand(n, 1, 1, generator=g)
    inside = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius ** 2).float()
    level = 0.4 + 0.4 * torch.rand(n, 1, 1, generator=g)
    mottle = noise * torch.randn(n, size, size, generator=g)
    return ((level + mottle) * inside).clamp(0, 1).unsqueeze(1)


def test_c2st_is_at_chance_on_one_distribution_and_near_one_on_two():
    same = c2st_accuracy(discs(64, 1), discs(64, 2), folds=2, steps=60, batch_size=16)
    different = c2st_accuracy(discs(64, 1, noise=0.25), discs(64, 2), folds=2, steps=60, batch_size=16)
    assert 0.3 <= same <= 0.7, same
    assert different >= 0.9, different


def test_c2st_is_reproducible_and_needs_enough_images():
    a, b = discs(20, 1, noise=0.1), discs(20, 2)
    assert c2st_accuracy(a, b, folds=2, steps=3, seed=3) == c2st_accuracy(a, b, folds=2, steps=3, seed=3)
    try:
        c2st_accuracy(a[:2], b[:2], folds=5)
    except ValueError as error:
        assert "at least 5 images" in str(error)
    else:
        raise AssertionError("expected a ValueError")


def test_texture_measures_see_mottling_and_brightness():
    smooth, mottled = discs(8, 1), discs(8, 1, noise=0.1)
    assert (laplacian_in_brain(mottled) > 5 * laplacian_in_brain(smooth).clamp_min(1e-3)).all()
    assert intensity_distance(smooth, smooth) == 0.0
    assert abs(intensity_distance((smooth + 0.1 * (smooth > 0)).clamp(0, 1), smooth) - 0.1) < 0.02
    # the black background never counts: padding a set changes nothing
    assert torch.allclose(laplacian_in_brain(F.pad(mottled, (8, 8, 8, 8))), laplacian_in_brain(mottled), atol=1e-6)

"""Can generated slices be told from real ones? A classifier two-sample test and in-brain texture statistics.

* ``c2st_accuracy``: a small CNN trained from scratch to separate set A from set B, scored by k-fold held-out
  accuracy (Lopez-Paz & Oquab, 2017). 0.5 means indistinguishable to this classifier, 1.0 means always told
  apart. Always run beside its real-vs-real control: two disjoint sets of real slices.
* ``laplacian_in_brain``: the mean absolute Laplacian inside the (eroded) brain mask, per image: high-frequency
  energy, which is what blotchy, mottled texture raises.
* ``intensity_distance``: the Wasserstein-1 distance between the in-brain intensity distributions of two sets.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from brainvq.metrics import BRAIN_THRESHOLD


def classifier() -> nn.Module:
    """Four strided conv layers, global average pooling and one logit: small enough to train per fold on a CPU."""
    layers: list[nn.Module] = []
    for c_in, c_out, k in ((1, 16, 5), (16, 32, 3), (32, 64, 3), (64, 64, 3)):
        layers += [nn.Conv2d(c_in, c_out, k, stride=2, padding=k // 2), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1))


def c2st_accuracy(a: torch.Tensor, b: torch.Tensor, folds: int = 5, steps: int = 300, seed: int = 0,
                  batch_size: int = 32) -> float:
    """Held-out accuracy of a from-scratch CNN telling (N,1,H,W) images ``a`` from ``b`` (equal numbers of each),
    pooled over ``folds`` folds; each fold's CNN takes ``steps`` Adam steps. The seed fixes the fold assignment,
    the initialisations and the batch order."""
    n = min(len(a), len(b))
    if n < folds:
        raise ValueError(f"a classifier two-sample test needs at least {folds} images per set, got {n}")
    images = torch.cat([a[:n], b[:n]]).float()
    labels = torch.cat([torch.zeros(n), torch.ones(n)])
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.cat([torch.randperm(n, generator=generator) % folds for _ in range(2)])  # balanced folds
    correct = 0
    for fold in range(folds):
        train, held = fold_of != fold, fold_of == fold
        torch.manual_seed(seed * 1000 + fold)
        net = classifier()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        x, y = images[train], labels[train]
        net.train()
        for _ in range(steps):
            batch = torch.randint(len(x), (batch_size,), generator=generator)
            loss = F.binary_cross_entropy_with_logits(net(x[batch]).squeeze(1), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(chunk) for chunk in images[held].split(64)]).squeeze(1)
        correct += int(((logits > 0).float() == labels[held]).sum())
    return correct / (2 * n)


def brain_masks(images: torch.Tensor, erode: int = 3) -> torch.Tensor:
    """(N,1,H,W) bool: pixels above the brain threshold, eroded by ``erode`` px so that the skull-stripped edge
    does not count as texture."""
    mask = (images > BRAIN_THRESHOLD).float()
    if erode:
        mask = -F.max_pool2d(-mask, 2 * erode + 1, stride=1, padding=erode)  # min-pool = binary erosion
    return mask > 0.5


def laplacian_in_brain(images: torch.Tensor) -> torch.Tensor:
    """Per image: mean |discrete Laplacian| over the eroded brain mask (images in [0,1])."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    lap = F.conv2d(images.float(), kernel, padding=1).abs()
    mask = brain_masks(images)
    return (lap * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def intensity_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Wasserstein-1 distance between the in-brain pixel intensities of two image sets (intensity units, [0,1])."""
    from scipy.stats import wasserstein_distance

    values = [x.float()[brain_masks(x)].numpy() for x in (a, b)]
    return float(wasserstein_distance(*values))


def texture_report(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Texture of ``images`` against ``reference``: median in-brain |Laplacian| of each, and the intensity distance."""
    return {"laplacian_median": float(np.median(laplacian_in_brain(images).numpy())),
            "laplacian_median_reference": float(np.median(laplacian_in_brain(reference).numpy())),
            "intensity_w1": intensity_distance(images, reference)}

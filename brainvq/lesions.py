"""Brain masks and synthetic lesions in the style of the MOOD challenge, for measuring anomaly maps.

A lesion is an ellipse placed inside the brain that changes the slice in one of five ways (``KINDS``):

  bright   a uniform hyperintense blob (0.9-1.0), soft-edged: texture replaced by a flat bright region;
  dark     a uniform hypointense blob (0.0-0.2), soft-edged;
  noise    Gaussian noise (sigma 0.25) added inside the ellipse;
  foreign  a patch of the same slice from elsewhere in the brain, rotated by 90, 180 or 270 degrees;
  deform   a sink or source: pixels inside a disk pulled towards, or pushed away from, its centre.

Sizes (``SIZES``) are ranges of the ellipse's long semi-axis in pixels of the 256x256 frame (a brain is about
150 px wide). The label is the ellipse inside the brain of the clean slice. Everything is a float image in
[0, 1]; one ``numpy`` Generator drives every random choice, so a seed fixes the lesion.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

KINDS = ("bright", "dark", "noise", "foreign", "deform")
SIZES = {"small": (4, 7), "medium": (9, 14), "large": (16, 24)}
BRAIN_LEVEL = 0.04          # brain tissue is brighter than this; the padding is 0
CLOSING_RADIUS = 4          # closes sulci that open onto the brain's outline


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return r[:, None] ** 2 + r[None, :] ** 2 <= radius ** 2


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Boolean mask of the brain in a float slice: the largest bright component, closed and with holes filled
    (so ventricles and sulci count as brain). All False for an image with no pixel above ``BRAIN_LEVEL``."""
    labels, count = ndimage.label(image > BRAIN_LEVEL)
    if count == 0:
        return np.zeros(image.shape, dtype=bool)
    largest = labels == 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(image), labels, range(1, count + 1))))
    closed = ndimage.binary_closing(np.pad(largest, CLOSING_RADIUS), _disk(CLOSING_RADIUS))
    return ndimage.binary_fill_holes(closed[CLOSING_RADIUS:-CLOSING_RADIUS, CLOSING_RADIUS:-CLOSING_RADIUS])


@dataclass
class Lesion:
    """A lesioned slice, its label mask (inside the brain) and how it was made."""

    image: np.ndarray       # float32 (H,W) in [0,1]
    mask: np.ndarray        # bool (H,W)
    kind: str
    size: str
    center: tuple[int, int]
    radius: int


def _ellipse(shape: tuple[int, int], center: tuple[int, int], radius: int, rng: np.random.Generator) -> np.ndarray:
    """Soft ellipse weights in [0,1] (semi-axes radius and 0.6-1.0 x radius, random angle, 1-px soft edge)."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    minor = radius * rng.uniform(0.6, 1.0)
    dy, dx = rows - center[0], cols - center[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    distance = np.sqrt((u / radius) ** 2 + (v / minor) ** 2)       # 1 on the outline
    return np.clip((1.0 - distance) * radius + 0.5, 0.0, 1.0)       # ramps over about one pixel


def _foreign(image: np.ndarray, brain: np.ndarray, center: tuple[int, int], radius: int,
             rng: np.random.Generator) -> np.ndarray:
    """The image with the square around ``center`` replaced by a rotated square from another brain point."""
    ys, xs = np.nonzero(brain)
    far = (ys - center[0]) ** 2 + (xs - center[1]) ** 2 > (2 * radius) ** 2
    pick = rng.choice(np.flatnonzero(far)) if far.any() else rng.integers(len(ys))
    padded = np.pad(image, radius)              # so squares near the frame's edge stay whole
    source = padded[ys[pick]:ys[pick] + 2 * radius + 1, xs[pick]:xs[pick] + 2 * radius + 1]
    padded[center[0]:center[0] + 2 * radius + 1, center[1]:center[1] + 2 * radius + 1] = \
        np.rot90(source, int(rng.integers(1, 4)))
    return padded[radius:-radius, radius:-radius]


def _deform(image: np.ndarray, center: tuple[int, int], radius: int, rng: np.random.Generator) -> np.ndarray:
    """Sink (pull towards the centre) or source (push away): r_src = r * (r/R)^(+-0.5) inside the disk of radius R."""
    rows, cols = np.mgrid[0:image.shape[0], 0:image.shape[1]].astype(np.float64)
    dy, dx = rows - center[0], cols - center[1]
    r = np.sqrt(dy ** 2 + dx ** 2)
    power = 0.5 if rng.random() < 0.5 else -0.5            # source / sink
    scale = np.where((r < radius) & (r > 0), (np.maximum(r, 1e-6) / radius) ** power, 1.0)
    return ndimage.map_coordinates(image, [center[0] + dy * scale, center[1] + dx * scale], order=1, mode="nearest")


def add_lesion(image: np.ndarray, kind: str, size: str, rng: np.random.Generator,
               brain: np.ndarray | None = None) -> Lesion:
    """Put one synthetic lesion of ``kind`` and ``size`` inside the brain of a float slice in [0,1]."""
    if kind not in KINDS:
        raise ValueError(f"lesion kind must be one of {KINDS}, not {kind!r}")
    if size not in SIZES:
        raise ValueError(f"lesion size must be one of {tuple(SIZES)}, not {size!r}")
    image = np.asarray(image, dtype=np.float64)
    brain = brain_mask(image) if brain is None else brain
    if brain.sum() < 50:
        raise ValueError("the slice has no brain to put a lesion in (fewer than 50 pixels above the background)")
    radius = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
    inner = ndimage.binary_erosion(brain, _disk(radius))   # the whole lesion lies inside the brain
    ys, xs = np.nonzero(inner if inner.any() else brain)
    pick = rng.integers(len(ys))
    center = (int(ys[pick]), int(xs[pick]))
    if kind == "deform":
        rows, cols = np.ogrid[0:image.shape[0], 0:image.shape[1]]
        region = (rows - center[0]) ** 2 + (cols - center[1]) ** 2 < radius ** 2
        out = _deform(image, center, radius, rng)
    else:
        weight = _ellipse(image.shape, center, radius, rng)
        region = weight >= 0.5
        if kind == "bright":
            changed = np.full_like(image, rng.uniform(0.9, 1.0))
        elif kind == "dark":
            changed = np.full_like(image, rng.uniform(0.0, 0.2))
        elif kind == "noise":
            changed = image + rng.normal(0.0, 0.25, image.shape)
        else:
            changed = _foreign(image, brain, center, radius, rng)
        out = image * (1 - weight) + changed * weight
    return Lesion(np.clip(out, 0.0, 1.0).astype(np.float32), region & brain, kind, size, center, radius)

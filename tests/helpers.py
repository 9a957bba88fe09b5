"""Builders of tiny on-disk data sets, and the training scripts as modules, for tests; importable as
``from helpers import ...`` from any test file."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

OASIS_SUBDIRS = ("keras_png_slices_train", "keras_png_slices_validate", "keras_png_slices_test")


def brain_slice(height: int, width: int, seed: int, background: tuple[int, int] = (20, 60)) -> np.ndarray:
    """A uint8 height x width slice: dim noise everywhere (never 0) with a bright ellipse "brain" in the middle."""
    rng = np.random.default_rng(seed)
    image = rng.integers(background[0], background[1], size=(height, width)).astype(np.float64)
    rows, cols = np.mgrid[0:height, 0:width]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    ry, rx = height * 0.38, width * 0.32
    inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
    image[inside] = rng.integers(150, 230, size=int(inside.sum()))
    return image.astype(np.uint8)


def make_oasis_tree(root: str | Path, train_cases: int = 16, validate_cases: int = 4, test_cases: int = 2,
                    slices: int = 3, size: int = 256, seed: int = 0) -> Path:
    """Write an OASIS ``keras_png_slices_data`` layout under ``root`` and return ``root``.

    Cases are numbered from 1 across the three folders (train first, then validate, then test), each with
    ``slices`` PNGs named ``case_NNN_slice_S.nii.png`` (S counted from 0), ``size`` x ``size`` grayscale.
    """
    root = Path(root)
    case = 1
    for sub, count in zip(OASIS_SUBDIRS, (train_cases, validate_cases, test_cases)):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            for s in range(slices):
                pixels = brain_slice(size, size, seed=seed * 1_000_003 + case * 1000 + s)
                Image.fromarray(pixels).save(folder / f"case_{case:03d}_slice_{s}.nii.png")
            case += 1
    return root


def make_folder_tree(root: str | Path, classes: tuple[str, ...] = ("ClassA", "ClassB"), per_class: int = 20,
                     test_count: int = 6, width: int = 176, height: int = 208, seed: int = 0) -> Path:
    """Write a plain image-folder layout under ``root`` and return ``root``.

    ``train/<class>/img_NNN.jpg`` (``width`` x ``height`` grayscale JPEGs, like the Kaggle Alzheimer set)
    and ``test/test_NNN.png`` (same size, lossless, no class folders).
    """
    root = Path(root)
    n = 0
    for label in classes:
        folder = root / "train" / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = brain_slice(height, width, seed=seed * 1_000_003 + n)
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.jpg", quality=95)
            n += 1
    test = root / "test"
    test.mkdir(parents=True, exist_ok=True)
    for i in range(test_count):
        pixels = brain_slice(height, width, seed=seed * 1_000_003 + 500_000 + i)
        Image.fromarray(pixels).save(test / f"test_{i:03d}.png")
    return root


def train_script(name: str) -> ModuleType:
    """``train/NAME.py`` loaded as a fresh module, so a test calls its ``main(argv)`` in-process."""
    path = Path(__file__).resolve().parents[1] / "train" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

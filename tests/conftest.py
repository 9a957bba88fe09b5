"""Shared fixtures. Tree builders live in tests/helpers.py (``from helpers import make_oasis_tree``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Before anything imports huggingface_hub, which reads it once: no telemetry request (its list of agent harnesses)
# to the import-time HF_ENDPOINT, so the tests' requests go only where HF_ENDPOINT points when they run.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
for _path in (str(REPO_ROOT), str(TESTS_DIR)):  # brainvq and helpers import however pytest is started
    if _path not in sys.path:
        sys.path.insert(0, _path)

from helpers import make_folder_tree, make_oasis_tree  # noqa: E402

torch.set_num_threads(1)

# The Kaggle Alzheimer 4-class set (train/ 5,121 JPEGs, test/ 1,279), beside the repo: /work/shared/...
REAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/alzheimer4class"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Every test gets its own BRAINVQ_CACHE, so none reads or writes ~/.cache/brainvq; BRAINVQ_DATA is unset."""
    path = tmp_path / "brainvq-cache"
    monkeypatch.setenv("BRAINVQ_CACHE", str(path))
    monkeypatch.delenv("BRAINVQ_DATA", raising=False)
    return path


@pytest.fixture
def oasis_tree(tmp_path, cache_dir) -> Path:
    """A tiny OASIS keras_png_slices_data root: 16 train + 4 validate cases and 2 test cases, 3 slices each."""
    return make_oasis_tree(tmp_path / "keras_png_slices_data")


@pytest.fixture
def folder_tree(tmp_path, cache_dir) -> Path:
    """A tiny plain-folder root: train/ClassA, train/ClassB with 20 176x208 JPEGs each; test/ with 6 PNGs."""
    return make_folder_tree(tmp_path / "images")


@pytest.fixture
def real_data(request, monkeypatch) -> Path:
    """The real data root, or a skip when it is not there.

    Its cache lives in .pytest_cache (not ~/.cache, not per-test tmp), so only the first run pays the decode.
    """
    if not (REAL_DATA / "train").is_dir() or not (REAL_DATA / "test").is_dir():
        pytest.skip(f"real data set not found at {REAL_DATA} (needs train/ and test/)")
    monkeypatch.setenv("BRAINVQ_CACHE", str(request.config.cache.mkdir("brainvq-real-data-cache")))
    return REAL_DATA

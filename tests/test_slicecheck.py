"""The upload check: features from the models, limits from healthy slices, verdicts in the Reconstruct tab."""
from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from brainvq import anomaly, demo, demo_prior, hub, lesions, slicecheck
from test_anomaly import slices
from test_app import save_tiny_bundle


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """A tiny bundle whose slice-check limits were fitted on 24 helper brain slices."""
    folder = save_tiny_bundle(tmp_path_factory.mktemp("check") / "bundle", seed=0)
    bundle = hub.load_bundle(folder)
    rows = slicecheck.features(bundle.vqvae, bundle.prior, slices(24, seed=200))
    slicecheck.Limits(slicecheck.fit_limits(rows), anomaly.model_fingerprints(bundle.vqvae, bundle.prior)).save(
        folder / anomaly.ANOMALY_DIR / slicecheck.LIMITS_NAME)
    return bundle


def test_features_of_a_brain_slice(checked):
    row = slicecheck.features(checked.vqvae, checked.prior, slices(1, seed=300))[0]
    assert set(row) == set(slicecheck.FEATURES)
    assert 0 < row["bits"] and 0 < row["brain_bits"] and -1 <= row["ssim_brain"] <= 1
    assert 1.2 < row["aspect"] < 1.5            # the ellipse is taller than wide, like an axial brain
    assert 0.9 < row["solidity"] <= 1.01 and row["offset"] < 5 and row["outside"] == 0
    empty = slicecheck.features(checked.vqvae, checked.prior, np.zeros((1, 256, 256), np.float32))[0]
    assert empty["area"] == 0 and empty["aspect"] is None and empty["bits"] > 0


def test_features_reuse_the_callers_encoding(checked):
    """The Reconstruct tab passes the codes and reconstruction it has: the features are those computed afresh."""
    import torch

    x = slices(2, seed=301)
    with torch.no_grad():
        codes = checked.vqvae.encode(torch.from_numpy(x)[:, None])
        recon = checked.vqvae.decode(codes).clamp(0, 1).float()
    brains = [lesions.brain_mask(image) for image in x]
    assert slicecheck.features(checked.vqvae, checked.prior, x, encoded=(codes, recon), brains=brains) == \
        slicecheck.features(checked.vqvae, checked.prior, x)


def test_fit_limits_widens_the_validation_range():
    rows = [dict.fromkeys(slicecheck.FEATURES, float(v)) for v in range(201)]   # 0..200: 1st to 199th percentile
    low, high = slicecheck.fit_limits(rows)["area"]
    assert low == pytest.approx(1.0 - 198.0) and high == pytest.approx(199.0 + 198.0)


def test_reconstruct_labels_what_does_not_look_like_a_brain(checked):
    rng = np.random.default_rng(0)
    good = demo.reconstruct(checked, (slices(1, seed=400)[0] * 255).astype(np.uint8))
    assert good.check is not None and good.check.ok, good.check.reasons
    assert "Looks like an axial brain slice" in good.check_markdown()
    assert "over the brain" in good.summary() and good.ssim_brain is not None
    noise = demo.reconstruct(checked, rng.integers(0, 256, (256, 256), dtype=np.uint8))
    assert not noise.check.ok and noise.check.failed and "does not look like" in noise.check_markdown()
    tiny = np.zeros((256, 256), np.uint8)
    tiny[128, 128] = 255                          # a 1x1 upload, padded
    dot = demo.reconstruct(checked, tiny)
    assert dot.check.failed == ["no brain"] and "no brain found" in dot.summary()
    brain = Image.fromarray((slices(1)[0][24:232, 40:216] * 255).astype(np.uint8))
    wide = np.zeros((256, 256), np.uint8)
    wide[90:166, 10:246] = np.asarray(brain.resize((236, 76)))   # squashed into a wide band: wrong proportions
    squashed = demo.reconstruct(checked, wide).check
    assert not squashed.ok and "aspect" in squashed.failed


def test_reconstruct_says_when_it_cannot_check(checked, tmp_path):
    other = hub.load_bundle(save_tiny_bundle(tmp_path / "other", seed=1))
    result = demo.reconstruct(other, (slices(1)[0] * 255).astype(np.uint8))
    assert result.check is None and "bench/slice_check.py" in result.check_markdown()
    misplaced = hub.ModelBundle(other.vqvae, other.prior, "test", folder=checked.folder)   # limits of other models
    assert "other models" in demo.reconstruct(misplaced, result.original).check_note
    decoder = copy.deepcopy(checked.vqvae)         # the same codebook, a fine-tuned decoder
    with torch.no_grad():
        next(decoder.decoder.parameters()).add_(0.01)
    tuned = hub.ModelBundle(decoder, checked.prior, "test", folder=checked.folder)
    assert "other models" in demo.reconstruct(tuned, result.original).check_note
    bare = hub.load_bundle(save_tiny_bundle(tmp_path / "vq-only", seed=0, prior=False))
    assert "needs the PixelCNN prior" in demo.reconstruct(bare, result.original).check_markdown()


def test_limits_are_read_once_per_loaded_bundle_and_dropped_with_it(checked, tmp_path):
    """A request neither re-reads the limits nor re-hashes the models; a reload reads them afresh, and a replaced
    bundle (with its models and anomaly detector) is freed, not kept alive by the memo."""
    import gc
    import shutil

    folder = tmp_path / "bundle"
    shutil.copytree(checked.folder, folder)
    bundle = hub.load_bundle(folder)
    image = (slices(1, seed=400)[0] * 255).astype(np.uint8)
    assert demo.reconstruct(bundle, image).check.ok
    (folder / anomaly.ANOMALY_DIR / slicecheck.LIMITS_NAME).unlink()
    assert demo.reconstruct(bundle, image).check.ok                        # the loaded bundle keeps its limits
    assert demo.reconstruct(hub.load_bundle(folder), image).check is None   # a reload sees they are gone
    assert demo_prior.detector_for(bundle) is demo_prior.detector_for(bundle)   # the Anomaly tab's, made once too
    dropped = weakref.ref(bundle.prior)
    del bundle
    gc.collect()
    assert dropped() is None

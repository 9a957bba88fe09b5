"""Synthetic lesions, anomaly maps, their calibration and the CLI, on tiny real (untrained) models."""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brainvq import anomaly, lesions
from brainvq.pixelcnn import GatedPixelCNN, PixelCNNConfig
from helpers import brain_slice
from test_app import save_tiny_bundle


def slices(n: int, seed: int = 0) -> np.ndarray:
    """Float 256x256 slices: the helpers' bright-ellipse brain, 176x208, centre-padded with black."""
    out = np.zeros((n, 256, 256), dtype=np.float32)
    for k in range(n):
        out[k, 24:232, 40:216] = brain_slice(208, 176, seed=seed + k, background=(0, 1)) / 255.0
    return out


def save_local_prior(folder: Path, vqvae_fingerprint: str) -> None:
    torch.manual_seed(1)
    net = GatedPixelCNN(PixelCNNConfig(num_codes=16, grid_size=64, channels=8, embed_dim=8, num_layers=1,
                                       first_kernel=3, max_dilation=1, pos_dim=0, head_channels=8))
    net.save(folder / anomaly.ANOMALY_DIR / "local", vqvae_fingerprint)


def calibrate_tiny_bundle(folder: Path) -> Path:
    """Add a local prior and an anomaly calibration (every component, 4 healthy slices) to a tiny bundle."""
    detector = anomaly.Detector.load(folder)
    save_local_prior(folder, detector.vqvae.fingerprint())
    detector = anomaly.Detector.load(folder)
    settings = anomaly.Settings(components=("recon", "surprise", "ratio", "restoration"), restorations=2)
    healthy = slices(4, seed=100)
    threshold = anomaly.restore_threshold(detector.measure(healthy, ["surprise"], settings), 0.05)
    measured = detector.measure(healthy, settings.components, settings, threshold)
    anomaly.calibrate(measured, settings, detector.fingerprints(), threshold).save(
        folder / anomaly.ANOMALY_DIR / anomaly.CALIBRATION_NAME)
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """Tiny VQ-VAE + prior + local prior, calibrated."""
    return calibrate_tiny_bundle(save_tiny_bundle(tmp_path_factory.mktemp("anomaly") / "checkpoints", seed=0))


# ----------------------------------------------------------------------------- lesions


def test_brain_mask_fills_holes_and_ignores_specks():
    image = slices(1)[0]
    image[120:130, 120:130] = 0.0           # a dark "ventricle" inside the brain
    image[5:8, 5:8] = 1.0                   # a bright speck in the background
    mask = lesions.brain_mask(image)
    assert mask[125, 125] and not mask[6, 6]
    assert abs(int(mask.sum()) - int((image > 0.5).sum())) < 0.1 * mask.sum()
    assert not lesions.brain_mask(np.zeros((256, 256), np.float32)).any()


@pytest.mark.parametrize("kind", lesions.KINDS)
def test_lesions_change_the_slice_inside_the_brain_where_labelled(kind):
    clean = slices(1, seed=3)[0]
    brain = lesions.brain_mask(clean)
    for size, (low, high) in lesions.SIZES.items():
        lesion = lesions.add_lesion(clean, kind, size, np.random.default_rng(7))
        again = lesions.add_lesion(clean, kind, size, np.random.default_rng(7))
        assert np.array_equal(lesion.image, again.image) and np.array_equal(lesion.mask, again.mask)
        assert lesion.mask.any() and not (lesion.mask & ~brain).any()
        assert low <= lesion.radius <= high and brain[lesion.center]
        changed = np.abs(lesion.image - clean) > 1e-6
        near = np.zeros_like(brain)
        near[max(0, lesion.center[0] - high - 2):lesion.center[0] + high + 3,
             max(0, lesion.center[1] - high - 2):lesion.center[1] + high + 3] = True
        assert changed.any() and not (changed & ~near).any(), (kind, size)   # only around the lesion
        assert lesion.image.min() >= 0 and lesion.image.max() <= 1


def test_lesion_refuses_bad_requests():
    clean = slices(1)[0]
    with pytest.raises(ValueError, match="kind must be one of"):
        lesions.add_lesion(clean, "tumour", "small", np.random.default_rng(0))
    with pytest.raises(ValueError, match="size must be one of"):
        lesions.add_lesion(clean, "bright", "huge", np.random.default_rng(0))
    with pytest.raises(ValueError, match="no brain"):
        lesions.add_lesion(np.zeros((256, 256)), "bright", "small", np.random.default_rng(0))


# ----------------------------------------------------------------------------- maps


def test_components_shapes_and_meaning(bundle):
    detector = anomaly.Detector.load(bundle)
    settings = anomaly.Settings(sigma={name: 0.0 for name in anomaly.COMPONENTS})
    images = slices(2)
    results = detector.measure(images, anomaly.COMPONENTS, settings, restore_threshold=1.0)
    x = torch.from_numpy(images)[:, None]
    with torch.no_grad():
        codes = detector.vqvae.encode(x)
        recon = detector.vqvae.decode(codes)[:, 0].numpy()
        log_p = detector.prior(codes).log_softmax(1)
    nll_bits = (-log_p.gather(1, codes[:, None])[:, 0] / np.log(2)).numpy()
    for k, r in enumerate(results):
        assert set(r.components) == set(anomaly.COMPONENTS)
        assert all(m.shape == (256, 256) and m.dtype == np.float32 for m in r.components.values())
        assert np.array_equal(r.codes, codes[k].numpy()) and np.allclose(r.nll, nll_bits[k], atol=1e-4)
        assert np.allclose(r.components["recon"], np.abs(images[k] - recon[k]), atol=1e-5)
        assert r.restoration.shape == (256, 256) and r.map is None
        assert np.allclose(r.components["restoration"], np.abs(images[k] - r.restoration), atol=1e-6)


def test_restoration_keeps_every_likely_code(bundle):
    detector = anomaly.Detector.load(bundle)
    images = slices(2)
    with torch.no_grad():
        codes = detector.vqvae.encode(torch.from_numpy(images)[:, None])
        recon = detector.vqvae.decode(codes)[:, 0].numpy()
    none = torch.zeros(codes.shape, dtype=torch.bool)
    assert np.allclose(detector.restore(codes, none, count=2), recon, atol=1e-6)  # nothing resampled: the recon
    some = none.clone()
    some[:, 20:30, 20:40] = True
    restored = detector.restore(codes, some, count=2, seed=5)
    assert np.allclose(restored, detector.restore(codes, some, count=2, seed=5))     # seeded
    assert not np.allclose(restored, recon, atol=1e-3)
    # the decoder's receptive field is a few codes wide: far from the resampled block nothing moves
    assert np.allclose(restored[:, 200:, :], recon[:, 200:, :], atol=1e-6)


def test_analyze_gives_calibrated_maps_and_scores(bundle):
    detector = anomaly.Detector.load(bundle)
    cal = detector.require_calibration()
    assert cal.settings.components == ("recon", "surprise", "ratio", "restoration")
    images = slices(2, seed=50)
    images[1] = lesions.add_lesion(images[1], "bright", "large", np.random.default_rng(0)).image
    results = detector.analyze(images, restore=True)
    for r in results:
        assert r.map.shape == (256, 256) and r.map.dtype == np.float32
        assert r.map.min() >= 0 and not r.map[~r.brain].any()
        assert r.score == pytest.approx(anomaly.image_score(r.map, r.brain, cal.settings.image_quantile))  # "max"
        assert 0.0 <= r.percentile <= 100.0 and r.restoration is not None
        assert "nll" in r.components
    assert cal.percentile(-1.0) == 0.0 and cal.percentile(1e9) == 100.0


def test_combine_scales_each_component_by_its_healthy_statistics():
    brain = np.zeros((4, 4), dtype=bool)
    brain[1:3, 1:3] = True
    scales, names = {"recon": (1.0, 3.0), "nll": (0.0, 10.0)}, ("recon", "nll")
    comps = {"recon": np.full((4, 4), 5.0), "nll": np.full((4, 4), 40.0)}
    out = anomaly.combine(comps, brain, scales, names)
    assert np.allclose(out[brain], 4.0) and not out[~brain].any()      # max((5-1)/2, 40/10)
    assert not anomaly.combine({"recon": np.zeros((4, 4)), "nll": np.zeros((4, 4))}, brain, scales, names).any()
    stack = anomaly.combine({k: np.stack([v, v]) for k, v in comps.items()}, np.stack([brain, brain]), scales, names)
    assert np.array_equal(stack[1], out)


def test_the_sum_rule_scores_slices_by_the_summed_scaled_components(bundle, tmp_path):
    detector = anomaly.Detector.load(bundle)
    cal = detector.require_calibration()
    healthy = detector.measure(slices(3, seed=60), cal.settings.components, cal.settings, cal.restore_threshold)
    summed = anomaly.calibrate(healthy, replace(cal.settings, image_rule="sum"), cal.models, cal.restore_threshold,
                               cal.scales)
    detector.calibration = summed
    result = detector.analyze(slices(1, seed=61))[0]
    assert np.array_equal(result.map, anomaly.combine(result.components, result.brain, cal.scales,
                                                      cal.settings.components))      # the map is still the max
    total = sum(anomaly.scale(result.components[n], *cal.scales[n]) for n in cal.settings.components)
    expected = np.quantile(np.maximum(total, 0)[result.brain], cal.settings.image_quantile)
    assert result.score == pytest.approx(expected, rel=1e-5)
    assert summed.healthy_scores == sorted(anomaly.slice_score(a.components, a.brain, cal.scales, summed.settings)
                                           for a in healthy)
    loaded = anomaly.Calibration.load(summed.save(tmp_path / "summed.json"))
    assert loaded.settings.image_rule == "sum"
    with pytest.raises(anomaly.AnomalyError, match="image_rule must be one of"):
        anomaly.Settings(image_rule="mean")


def test_calibration_must_match_the_models(bundle, tmp_path):
    detector = anomaly.Detector.load(bundle)
    path = tmp_path / "calibration.json"
    detector.calibration.save(path)
    loaded = anomaly.Calibration.load(path)
    assert loaded == detector.calibration
    other = GatedPixelCNN(detector.prior.cfg)                    # same shape, other weights
    stale = anomaly.Detector(detector.vqvae, other, detector.local, loaded)
    assert stale.calibration is None and "other models" in stale.calibration_problem
    with pytest.raises(anomaly.AnomalyError, match="bench/anomaly.py --checkpoints"):
        stale.analyze(slices(1))
    tuned = copy.deepcopy(detector.vqvae)                        # a decoder fine-tune keeps the codebook
    with torch.no_grad():
        next(tuned.decoder.parameters()).add_(0.01)
    assert tuned.fingerprint() == detector.vqvae.fingerprint()
    assert "other models" in anomaly.Detector(tuned, detector.prior, detector.local, loaded).calibration_problem
    path.write_text("{not json")
    with pytest.raises(anomaly.AnomalyError, match="not a readable anomaly calibration"):
        anomaly.Calibration.load(path)
    with pytest.raises(anomaly.AnomalyError, match="components must be"):
        anomaly.Settings(components=("magic",))


def test_ratio_needs_a_local_prior(bundle):
    detector = anomaly.Detector.load(bundle)
    bare = anomaly.Detector(detector.vqvae, detector.prior)
    with pytest.raises(anomaly.AnomalyError, match="local-context prior"):
        bare.measure(slices(1), ["ratio"], anomaly.Settings())
    with pytest.raises(anomaly.AnomalyError, match=r"must be \(B,256,256\)"):
        detector.measure(np.zeros((1, 64, 64)), ["recon"], anomaly.Settings())


# ----------------------------------------------------------------------------- command line


def test_cli_writes_a_map_per_image_and_the_scores(bundle, tmp_path):
    images = tmp_path / "images"
    (images / "ClassA").mkdir(parents=True)
    Image.fromarray(brain_slice(208, 176, seed=1)).save(images / "one.png")
    Image.fromarray(brain_slice(208, 176, seed=2)).save(images / "ClassA" / "two.jpg")
    Image.fromarray(brain_slice(208, 176, seed=3)).save(images / "ClassA" / "one.png")   # same stem, sub-folder
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    out, report = tmp_path / "maps", tmp_path / "scores.json"
    scores = anomaly.main(["--checkpoints", str(bundle), "--images", str(images), "--out", str(out),
                           "--json", str(report)])
    assert set(scores) == {"one", "ClassA__two", "ClassA__one"}
    assert json.loads(report.read_text()) == pytest.approx(scores)
    for key in scores:
        array = np.load(out / f"{key}.npy")
        assert array.shape == (256, 256) and array.dtype == np.float32 and array.min() >= 0


def test_cli_says_how_to_calibrate(tmp_path):
    folder = save_tiny_bundle(tmp_path / "bare", seed=1)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(brain_slice(208, 176, seed=1)).save(images / "one.png")
    with pytest.raises(anomaly.AnomalyError, match="no anomaly calibration.*bench/anomaly.py"):
        anomaly.main(["--checkpoints", str(folder), "--images", str(images), "--out", str(tmp_path / "o"),
                      "--json", str(tmp_path / "s.json")])


# ----------------------------------------------------------------------------- the demo's Anomaly and Complete logic


def test_anomaly_view_streams_progress_then_panels(bundle):
    from brainvq import demo_prior, hub

    loaded = hub.load_bundle(bundle)
    image = (slices(1, seed=60)[0] * 255).astype(np.uint8)
    steps = list(demo_prior.analyze_stream(loaded, image, "bright", "large", seed=4))
    view, status = steps[-1]
    assert status == "Done." and all(v is None for v, _ in steps[:-1])
    for panel in (view.original, view.nll, view.overlay, view.restoration):
        assert panel.shape == (256, 256, 3) and panel.dtype == np.uint8
    assert (view.original == (0, 255, 0)).all(-1).any()            # the lesion's outline
    assert "Synthetic lesion: bright, large" in view.summary() and 0 <= view.dice <= 1
    assert "healthy validation" in view.summary()
    plain = list(demo_prior.analyze_stream(loaded, image))[-1][0]
    assert plain.lesion is None and "Synthetic" not in plain.summary()
    with pytest.raises(demo_prior.PriorToolError, match="Pick a slice"):
        list(demo_prior.analyze_stream(loaded, None))
    with pytest.raises(demo_prior.PriorToolError, match="seed must be a whole number"):
        list(demo_prior.analyze_stream(loaded, image, "dark", "small", seed=-1))


@pytest.mark.parametrize("mode", ["top rows", "outside a box"])
def test_completion_keeps_the_kept_codes(bundle, mode):
    from brainvq import demo_prior, hub

    loaded = hub.load_bundle(bundle)
    image = (slices(1, seed=70)[0] * 255).astype(np.uint8)
    frames = list(demo_prior.complete_stream(loaded, image, mode, keep_rows=0.25, box=(64, 64, 192, 128), n=3,
                                             seed=9))
    assert [f.filled for f in frames] == sorted(f.filled for f in frames) and frames[-1].done
    final = frames[-1]
    with torch.no_grad():
        codes = loaded.vqvae.encode(torch.from_numpy(image / np.float32(255))[None, None])[0].numpy()
    keep = demo_prior.keep_mask(64, mode, 0.25, (64, 64, 192, 128))
    assert keep.sum() == (16 * 64 if mode == "top rows" else 64 * 64 - 32 * 16)
    assert (final.codes[:, keep] == codes[keep]).all()               # the kept codes never change
    assert (final.codes[:, ~keep] != codes[~keep]).any() and (final.codes >= 0).all()
    assert len(final.completions) == 3 and final.completions[0].shape == (256, 256)
    assert "every kept code is unchanged" in final.status()
    again = list(demo_prior.complete_stream(loaded, image, mode, 0.25, (64, 64, 192, 128), n=3, seed=9))[-1]
    assert np.array_equal(again.codes, final.codes)                  # seeded


def test_completion_refuses_bad_settings(bundle):
    from brainvq import demo_prior, hub

    loaded = hub.load_bundle(bundle)
    image = (slices(1)[0] * 255).astype(np.uint8)
    for kwargs, phrase in [({"mode": "top rows", "keep_rows": 1.0}, "share of rows"),
                           ({"mode": "outside a box", "box": (100, 0, 50, 10)}, "box must satisfy"),
                           ({"mode": "left half"}, "must be one of"),
                           ({"n": 9}, "At most 8"), ({"temperature": -1}, "Temperature")]:
        with pytest.raises(demo_prior.DemoError, match=phrase):
            list(demo_prior.complete_stream(loaded, image, **kwargs))

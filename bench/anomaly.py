"""Anomaly maps on synthetic lesions (brainvq.lesions, MOOD-style): settings chosen on validation, reported on test.

    python bench/anomaly.py --data-dir ../shared/data/alzheimer4class --json bench/results/anomaly.json
    python bench/anomaly.py --timing-only --json bench/results/anomaly_timing.json   # with the trainer paused

Validation (lesion seed --val-seed): 150 slices get one lesion each (5 kinds x 3 sizes x 10), 50 stay healthy:
the search pool. The other validation slices (up to 300) are the healthy calibration set.
  1. the restoration resamples the codes whose surprise exceeds that of 5% of the healthy slices' brain codes
     (grown by one code, 2 restorations; fixed in exploration, see the README);
  2. each component's smoothing (sigma 2, 4 or 8 px) is the one with the best pixel AP on the pool;
  3. the method is the subset of {recon, surprise, ratio, restoration} whose combination (max of the scaled
     maps) has the best pixel AP on the pool; the image score (the quantile 0.99, 0.999 or 1, inside the brain,
     of those maps combined by their max or their sum) the best image AUROC on the pool;
  4. the calibration is written to CHECKPOINTS/anomaly/calibration.json: the components' scales (the pool's
     healthy slices), the overlay threshold (best Dice on the pool), and the restoration threshold and healthy
     image scores (the healthy calibration set).
Test (seed --test-seed): 300 test slices, 240 with a lesion (16 per kind and size), 60 healthy. Every method
is scored the same way: pixel AP over the brain pixels of all 300 slices, the best Dice over thresholds, and
image AUROC (lesioned vs healthy) of the image score; per kind, over that kind's slices plus the healthy ones.
Methods: the VQ-VAE reconstruction error (the baseline), the prior's raw NLL, each component alone, the chosen
combination. The brain is the clean slice's brain mask; the maps mask with the brain they find themselves.
Also saves docs/anomaly.png: one test slice per kind, with its label, NLL map, restoration and anomaly map.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq import anomaly, data, lesions  # noqa: E402
from brainvq.io import write_report  # noqa: E402
from brainvq.metrics import auroc, average_precision, best_dice  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEARCHED = ("recon", "surprise", "ratio", "restoration")
SIGMAS = (2.0, 4.0, 8.0)
QUANTILES = (0.99, 0.999, 1.0)
RAW = anomaly.Settings(sigma={name: 0.0 for name in anomaly.COMPONENTS})   # smoothing is applied here


def lesion_set(images: np.ndarray, per_cell: int, healthy: int, seed: int) -> dict:
    """``per_cell`` lesions of every kind and size, then ``healthy`` clean slices, on distinct random slices."""
    rng = np.random.default_rng(seed)
    cells = [(k, s) for k in lesions.KINDS for s in lesions.SIZES for _ in range(per_cell)] + [("healthy", "-")] * healthy
    order = rng.permutation(len(images))
    out = {"x": [], "label": [], "brain": [], "kind": [], "size": [], "index": order[:len(cells)]}
    for (kind, size), index in zip(cells, order):
        clean = images[index].astype(np.float32) / 255.0
        brain = lesions.brain_mask(clean)
        lesion = None if kind == "healthy" else lesions.add_lesion(clean, kind, size, rng, brain)
        out["x"].append(clean if lesion is None else lesion.image)
        out["label"].append(np.zeros_like(brain) if lesion is None else lesion.mask)
        out["brain"].append(brain)
        out["kind"].append(kind)
        out["size"].append(size)
    return {k: np.stack(v) if k in ("x", "label", "brain") else np.asarray(v) for k, v in out.items()}


def measure(detector: anomaly.Detector, images: np.ndarray, names, threshold: float | None, seed: int,
            batch: int, what: str) -> list[anomaly.Analysis]:
    out = []
    for start in tqdm(range(0, len(images), batch), desc=what, unit="batch", leave=False):
        out += detector.measure(images[start:start + batch], names, RAW, threshold, seed + start)
    return out


def smoothed(results: list[anomaly.Analysis], name: str, sigma: float) -> np.ndarray:
    return anomaly.smooth(np.stack([r.components[name] for r in results]), sigma)


def scores(maps: np.ndarray, masks: np.ndarray, truth: dict, quantile: float,
           score_maps: np.ndarray | None = None) -> dict:
    """Pixel AP, best Dice and image AUROC overall and per kind. ``masks``: the brains the method found; the image
    score is the ``quantile`` of ``score_maps`` (default: the maps) inside them."""
    lesioned = truth["kind"] != "healthy"
    image = np.array([anomaly.image_score(m, b, quantile) for m, b in zip(maps if score_maps is None else score_maps,
                                                                           masks)])

    def block(select: np.ndarray) -> dict:
        brain = truth["brain"][select]
        values, labels = maps[select][brain], truth["label"][select][brain]
        return {"pixel_ap": average_precision(values, labels), "best_dice": best_dice(values, labels)[0],
                "image_auroc": auroc(image[select], lesioned[select])}

    result = block(np.ones(len(maps), dtype=bool))
    result["per_kind"] = {k: block((truth["kind"] == k) | ~lesioned) for k in lesions.KINDS}
    return result




def choose(detector, val: data.SliceSet, args) -> tuple[anomaly.Calibration, dict]:
    """Steps 1-4 of the docstring, on validation slices only."""
    pool = lesion_set(val.images, args.val_per_cell, args.val_healthy, args.val_seed)
    rest = np.setdiff1d(np.arange(len(val)), pool["index"])[:args.calibration_slices]
    rest_images = val.images[rest].astype(np.float32) / 255.0
    names = [n for n in SEARCHED if n != "ratio" or detector.local is not None]
    settings = anomaly.Settings()
    cheap = [n for n in names if n != "restoration"]
    healthy = measure(detector, rest_images, cheap, None, args.sampling_seed, args.batch, "val healthy")
    threshold = anomaly.restore_threshold(healthy, settings.restore_fraction)
    found = measure(detector, pool["x"], names, threshold, args.sampling_seed, args.batch, "val pool")
    masks = np.stack([r.brain for r in found])
    is_healthy = pool["kind"] == "healthy"
    search: dict = {"sigma": {}, "subsets": {}, "image_score": {}}
    maps = {}
    for name in names:
        best = None
        for sigma in SIGMAS:
            m = smoothed(found, name, sigma)
            ap = scores(np.where(masks, m, 0), masks, pool, 1.0)["pixel_ap"]
            search["sigma"][f"{name}@{sigma:g}"] = ap
            if best is None or ap > best[0]:
                best = (ap, sigma, m)
        settings.sigma[name], maps[name] = best[1], best[2]
    scales = anomaly.fit_scales([{n: maps[n][k] for n in names} for k in np.flatnonzero(is_healthy)],
                                masks[is_healthy])
    best = None
    for r in range(1, len(names) + 1):
        for subset in itertools.combinations(names, r):
            ap = scores(anomaly.combine(maps, masks, scales, subset), masks, pool, 1.0)["pixel_ap"]
            search["subsets"]["+".join(subset)] = ap
            if best is None or ap > best[0]:
                best = (ap, subset)
    settings.components = best[1]
    chosen = anomaly.combine(maps, masks, scales, settings.components)
    for rule in anomaly.RULES:
        combined = anomaly.combine(maps, masks, scales, settings.components, rule)
        for q in QUANTILES:
            search["image_score"][f"{rule}@{q:g}"] = scores(chosen, masks, pool, q, combined)["image_auroc"]
    rule, quantile = max(search["image_score"], key=search["image_score"].get).split("@")
    settings.image_rule, settings.image_quantile = rule, float(quantile)
    pool_brain = pool["brain"]
    search["best_dice"], pixel_threshold = best_dice(chosen[pool_brain], pool["label"][pool_brain])
    if "restoration" in settings.components:   # the healthy set was measured without it
        healthy = measure(detector, rest_images, settings.components, threshold, args.sampling_seed, args.batch,
                          "val healthy (restoration)")
    for result in healthy:
        result.components = {n: anomaly.smooth(result.components[n][None], settings.sigma[n])[0]
                             for n in settings.components}
    notes = {"data": str(val.root), "split_seed": args.split_seed, "val_lesion_seed": args.val_seed,
             "sampling_seed": args.sampling_seed, "healthy_slices": len(healthy),
             "search_pool": {"lesioned": int((~is_healthy).sum()), "healthy": int(is_healthy.sum())},
             "made_by": "bench/anomaly.py"}
    calibration = anomaly.calibrate(healthy, settings, detector.fingerprints(), threshold, scales, pixel_threshold,
                                    notes)
    return calibration, search


def evaluate(detector, calibration: anomaly.Calibration, test: data.SliceSet, args) -> tuple[dict, dict]:
    truth = lesion_set(test.images, args.test_per_cell, args.test_healthy, args.test_seed)
    settings = calibration.settings
    names = sorted(set(SEARCHED) - ({"ratio"} if detector.local is None else set()) | {"nll"})
    found = measure(detector, truth["x"], names, calibration.restore_threshold, args.sampling_seed, args.batch,
                    "test")
    masks = np.stack([r.brain for r in found])
    for name in names:
        sigma = settings.sigma[name]
        for r, m in zip(found, smoothed(found, name, sigma)):
            r.components[name] = m
    results = {}
    for name in names:
        maps = np.where(masks, np.stack([r.components[name] for r in found]), 0.0)
        results[name] = scores(maps, masks, truth, settings.image_quantile)
    for r in found:
        r.map = anomaly.combine(r.components, r.brain, calibration.scales, settings.components)
    score_maps = np.stack([anomaly.combine(r.components, r.brain, calibration.scales, settings.components,
                                           settings.image_rule) for r in found])
    results["chosen"] = scores(np.stack([r.map for r in found]), masks, truth, settings.image_quantile, score_maps)
    return results, {"truth": truth, "found": found}


def figure(calibration: anomaly.Calibration, shown: dict, path: Path) -> None:
    """One test slice per kind (the large lesions): slice | label | NLL map | restoration | anomaly map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainvq.io import atomic_write_bytes

    truth, found = shown["truth"], shown["found"]
    picks = [int(np.flatnonzero((truth["kind"] == k) & (truth["size"] == "large"))[0]) for k in lesions.KINDS]
    picks.append(int(np.flatnonzero(truth["kind"] == "healthy")[0]))
    fig, axes = plt.subplots(len(picks), 5, figsize=(11, 2.3 * len(picks)), squeeze=False)
    for row, i in zip(axes, picks):
        r = found[i]
        nll = anomaly.to_pixels(torch.from_numpy(r.nll)[None], r.image.shape[-1], 0)[0]
        panels = [(r.image, "gray", f"{truth['kind'][i]} {truth['size'][i]}".strip(" -")),
                  (truth["label"][i], "gray", "lesion label"), (np.where(r.brain, nll, 0), "magma", "prior NLL (bits)"),
                  (r.restoration, "gray", "restoration (mean of 2)"), (r.image, "gray", "anomaly map")]
        for ax, (img, cmap, title) in zip(row, panels):
            ax.imshow(img, cmap=cmap)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        overlay = np.ma.masked_less(r.map, calibration.pixel_threshold)
        row[-1].imshow(overlay, cmap="autumn", alpha=0.6, vmin=calibration.pixel_threshold,
                       vmax=max(2 * calibration.pixel_threshold, float(r.map.max())))
        row[-1].set_title(f"anomaly map (score {image_score_text(r, calibration)})", fontsize=9)
    fig.suptitle("Synthetic test lesions: the prior's NLL, a restoration and the anomaly map (coloured: above the "
                 "threshold with the best Dice on validation)", fontsize=10)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)


def image_score_text(result: anomaly.Analysis, calibration: anomaly.Calibration) -> str:
    score = anomaly.slice_score(result.components, result.brain, calibration.scales, calibration.settings)
    return f"{score:.2f}, {calibration.percentile(score):.0f}th pct"


def timing(detector: anomaly.Detector, test: data.SliceSet, repeats: int) -> dict:
    """Seconds for one slice's anomaly map, and with the restoration shown in the demo (medians of repeats)."""
    torch.set_num_threads(2)
    x = test.images[:1].astype(np.float32) / 255.0
    detector.analyze(x)  # warm-up
    out = {}
    for restore in (False, True):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            detector.analyze(x, restore=restore)
            times.append(time.perf_counter() - start)
        out["map_with_restoration_s" if restore else "map_s"] = statistics.median(times)
    return {**out, "repeats": repeats, "threads": torch.get_num_threads(), "goal_s": 5.0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"), help="vqvae/, pixelcnn/, anomaly/local/")
    p.add_argument("--data-dir")
    p.add_argument("--split-seed", type=int, default=0, help="the train/validation split (as in training)")
    p.add_argument("--val-seed", type=int, default=1, help="validation lesions")
    p.add_argument("--test-seed", type=int, default=2, help="test slices and lesions")
    p.add_argument("--sampling-seed", type=int, default=0, help="restorations")
    p.add_argument("--val-per-cell", type=int, default=10, help="validation lesions per kind and size")
    p.add_argument("--val-healthy", type=int, default=50, help="healthy slices in the validation search pool")
    p.add_argument("--test-per-cell", type=int, default=16, help="test lesions per kind and size")
    p.add_argument("--test-healthy", type=int, default=60)
    p.add_argument("--calibration-slices", type=int, default=300, help="healthy validation slices calibrated on")
    p.add_argument("--batch", type=int, default=24, help="slices measured at once (restorations share a sampler)")
    p.add_argument("--figure", default=str(ROOT / "docs/anomaly.png"))
    p.add_argument("--timing-only", action="store_true", help="only time one slice (run it with the trainer paused)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    test = data.load_split(args.data_dir, "test", args.split_seed)
    if args.timing_only:
        return write_report(timing(anomaly.Detector.load(args.checkpoints), test, args.repeats), args.json)
    detector = anomaly.Detector.load(args.checkpoints)
    started = time.time()
    calibration, search = choose(detector, data.load_split(args.data_dir, "val", args.split_seed), args)
    calibration.save(Path(args.checkpoints) / anomaly.ANOMALY_DIR / anomaly.CALIBRATION_NAME)
    results, shown = evaluate(detector, calibration, test, args)
    figure(calibration, shown, Path(args.figure))
    baseline, chosen = results["recon"], results["chosen"]
    report = {"chosen": {"components": list(calibration.settings.components), "sigma": calibration.settings.sigma,
                         "image_quantile": calibration.settings.image_quantile,
                         "image_rule": calibration.settings.image_rule,
                         "restore_threshold_bits": calibration.restore_threshold},
              "test": results, "validation_search": search,
              "pixel_ap_vs_baseline": chosen["pixel_ap"] / baseline["pixel_ap"],
              "goals": {"pixel_ap_vs_baseline": 2.0, "image_auroc": 0.85},
              "test_set": {"lesioned": 15 * args.test_per_cell, "healthy": args.test_healthy,
                           "per_kind_and_size": args.test_per_cell},
              "local_prior": detector.local is not None, "minutes": (time.time() - started) / 60}
    return write_report(report, args.json)


if __name__ == "__main__":
    main()

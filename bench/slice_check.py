"""The upload check (brainvq.slicecheck): limits set on validation slices, false alarms on every test slice,
detection on a set of images that are not axial brain slices, built here.

    python bench/slice_check.py --data-dir ../shared/data/alzheimer4class --json bench/results/slice_check.json

Writes the limits to CHECKPOINTS/anomaly/slice_check.json (with the models' fingerprints), where the demo's
Reconstruct tab reads them. The not-a-brain set (seed --seed, ``--per-kind`` images of each kind), each image
passed through the demo's own preprocessing (brainvq.data.to_slice):

  photo                   crops of the two photographs shipped with matplotlib (a portrait, a gift box), RGB
  sagittal MRI            matplotlib's 16-bit sagittal head MRI (skull and neck included), shifted, flipped, gamma
  coronal / sagittal reslice   a head-shaped stack of test slices (each scaled by an ellipsoid's profile), cut
                          across: what a coronal or sagittal view of an axial stack looks like
  axial turned 90 degrees a test slice lying on its side
  gray noise, RGBA noise, smooth texture (blurred noise), shapes (ellipses and boxes), text, flat (one grey),
  gradient, tiny image (1-15 px a side)
Also reports SSIM of the reconstruction over the brain's bounding box beside the whole frame's, per kind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib import cbook
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq import anomaly, data, slicecheck  # noqa: E402
from brainvq.io import write_report  # noqa: E402
from brainvq.metrics import ssim  # noqa: E402
from brainvq.vqvae import VQVAE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = "brain slice image photo scan the of and axial coronal sagittal model code prior test sample".split()


def _photo(name: str) -> Image.Image:
    with cbook.get_sample_data(name) as file:
        return Image.open(file).convert("RGB").copy()


def _sagittal_mri() -> np.ndarray:
    with cbook.get_sample_data("s1045.ima.gz") as file:   # 256x256 16-bit sagittal head MRI
        return np.frombuffer(file.read(), np.uint16).reshape(256, 256).astype(np.float64)


def head_volume(slices: np.ndarray, depth: int, rng: np.random.Generator) -> np.ndarray:
    """Axial slices stacked into a head shape: slice z scaled about the centre by an ellipsoid's profile at z."""
    volume = np.zeros((depth, 256, 256))
    for z, pick in enumerate(rng.choice(len(slices), depth)):
        scale = np.sqrt(max(0.0, 1 - ((z - depth / 2) / (depth / 2)) ** 2))
        if scale > 0.05:
            volume[z] = ndimage.affine_transform(slices[pick].astype(np.float64), np.eye(2) / scale,
                                                 offset=128 - 128 / scale, order=1)
    return volume


def not_brain_set(axial: np.ndarray, per_kind: int, seed: int) -> list[tuple[str, Image.Image]]:
    """``per_kind`` images of each kind in the module docstring."""
    rng = np.random.default_rng(seed)
    photos, mri = [_photo("grace_hopper.jpg"), _photo("Minduka_Present_Blue_Pack.png")], _sagittal_mri()
    volume, font = head_volume(axial, 160, rng), ImageFont.load_default(size=18)
    out: list[tuple[str, Image.Image]] = []
    for k in range(per_kind):
        photo = photos[k % 2]
        w, h = photo.size
        side = int(rng.integers(min(w, h) // 3, min(w, h)))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(("photo", photo.crop((left, top, left + side, top + side)).resize((256, 256))))
        sagittal = np.roll((mri / mri.max()) ** rng.uniform(0.6, 1.4), tuple(rng.integers(-20, 21, 2)), (0, 1))
        sagittal = np.fliplr(sagittal) if k % 2 else sagittal
        out.append(("sagittal MRI", Image.fromarray((sagittal * 65535).astype(np.uint16))))
        out.append(("coronal reslice", Image.fromarray(volume[:, int(rng.integers(60, 200)), :][::-1].astype(np.uint8))))
        out.append(("sagittal reslice", Image.fromarray(volume[:, :, int(rng.integers(60, 200))][::-1].astype(np.uint8))))
        turned = np.rot90(axial[rng.integers(len(axial))], 1 if k % 2 else 3)
        out.append(("axial turned 90 degrees", Image.fromarray(np.ascontiguousarray(turned))))
        out.append(("gray noise", Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8))))
        out.append(("RGBA noise", Image.fromarray(rng.integers(0, 256, (256, 256, 4), dtype=np.uint8), "RGBA")))
        field = ndimage.gaussian_filter(rng.normal(size=(256, 256)), rng.uniform(2, 24))
        out.append(("smooth texture", Image.fromarray(((field - field.min()) / np.ptp(field) * 255).astype(np.uint8))))
        canvas = Image.new("L", (256, 256), int(rng.integers(0, 256)))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 12))):
            (y0, y1), (x0, x1) = np.sort(rng.integers(0, 256, 2)), np.sort(rng.integers(0, 256, 2))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=int(rng.integers(0, 256)))
        out.append(("shapes", canvas))
        page = Image.new("L", (256, 256), 0 if k % 2 == 0 else 255)
        draw = ImageDraw.Draw(page)
        for line in range(10):
            draw.text((8, 8 + 24 * line), " ".join(rng.choice(WORDS, 4)), fill=255 if k % 2 == 0 else 0, font=font)
        out.append(("text", page))
        out.append(("flat", Image.new("L", (256, 256), int(rng.integers(0, 256)))))
        ramp = np.linspace(0, 255, 256)[None, :].repeat(256, 0)
        out.append(("gradient", Image.fromarray(np.ascontiguousarray(np.rot90(ramp, k % 4)).astype(np.uint8))))
        side = int(rng.integers(1, 16))
        out.append(("tiny image", Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8))))
    return out


def measure(vqvae, prior, images: np.ndarray, what: str, batch: int = 16) -> list[dict]:
    """slicecheck features plus the whole-frame SSIM of each float slice."""
    rows = []
    for start in tqdm(range(0, len(images), batch), desc=what, unit="batch", leave=False):
        chunk = images[start:start + batch]
        found = slicecheck.features(vqvae, prior, chunk)
        with torch.no_grad():
            x = torch.from_numpy(chunk)[:, None]
            frame = ssim(vqvae.decode(vqvae.encode(x)).clamp(0, 1), x, per_image=True).tolist()
        rows += [{**f, "ssim_frame": s} for f, s in zip(found, frame)]
    return rows


def by_feature(verdicts: list[slicecheck.Verdict]) -> dict[str, int]:
    """How many verdicts each feature failed (a slice can fail several)."""
    return {name: sum(name in v.failed for v in verdicts) for name in ("no brain", *slicecheck.FEATURES)}


def median(rows: list[dict], name: str) -> float | None:
    values = [r[name] for r in rows if r[name] is not None]
    return float(np.median(values)) if values else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--data-dir")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=3, help="the not-a-brain set")
    p.add_argument("--per-kind", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args(argv)
    folder = Path(args.checkpoints)
    vqvae = VQVAE.from_pretrained(folder / "vqvae")
    prior = anomaly.scoring_prior(folder, vqvae)
    val = data.load_split(args.data_dir, "val", args.split_seed)
    test = data.load_split(args.data_dir, "test", args.split_seed)
    limits = slicecheck.Limits(slicecheck.fit_limits(measure(vqvae, prior, val.images / np.float32(255), "val")),
                               anomaly.model_fingerprints(vqvae, prior),
                               {"data": str(val.root), "split_seed": args.split_seed, "slices": len(val),
                                "rule": "validation 0.5th-99.5th percentile range, widened on each side by its width",
                                "made_by": "bench/slice_check.py"})
    limits.save(folder / anomaly.ANOMALY_DIR / slicecheck.LIMITS_NAME)
    test_rows = measure(vqvae, prior, test.images / np.float32(255), "test")
    alarms = [slicecheck.judge(r, limits.limits) for r in test_rows]
    odd = not_brain_set(test.images, args.per_kind, args.seed)
    odd_images = np.stack([data.to_slice(image)[0] for _, image in odd]) / np.float32(255)
    odd_rows = measure(vqvae, prior, odd_images, "not a brain")
    odd_verdicts = [slicecheck.judge(r, limits.limits) for r in odd_rows]
    flagged = np.array([not v.ok for v in odd_verdicts])
    kinds = [kind for kind, _ in odd]
    per_kind = {}
    for kind in dict.fromkeys(kinds):
        rows = [r for r, k in zip(odd_rows, kinds) if k == kind]
        per_kind[kind] = {"flagged": float(flagged[np.array(kinds) == kind].mean()),
                          "ssim_frame_median": median(rows, "ssim_frame"), "ssim_brain_median": median(rows, "ssim_brain")}
    result = {"limits": limits.limits,
              "test": {"slices": len(test_rows), "false_alarms": int(sum(not v.ok for v in alarms)),
                       "false_alarm_rate": float(np.mean([not v.ok for v in alarms])),
                       "false_alarms_by_feature": by_feature(alarms),
                       "false_alarm_reasons": [v.reasons for v in alarms if not v.ok][:20],
                       "ssim_frame_median": median(test_rows, "ssim_frame"),
                       "ssim_brain_median": median(test_rows, "ssim_brain")},
              "not_brain": {"images": len(odd_rows), "flagged_rate": float(flagged.mean()), "per_kind": per_kind,
                            "flagged_by_feature": by_feature(odd_verdicts)},
              "goals": {"false_alarm_rate": 0.01, "flagged_rate": 0.9}}
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

"""Anomaly maps from BrainVQ's own models: where does a slice differ from what the VQ-VAE and its prior expect?

Component maps, each a 256x256 float map of the padded frame (higher = more anomalous):

  recon        |x - decode(encode(x))|, Gaussian-smoothed: what the VQ-VAE cannot reproduce;
  nll          the prior's per-code NLL (bits), upsampled: the raw likelihood, dominated by ordinary texture;
  surprise     NLL minus the entropy of the prior's prediction at that code: how much more surprising the code
               is than the prior expected there, so busy texture (high entropy) no longer stands out;
  ratio        NLL under the full prior minus NLL under a local-context prior (a small PixelCNN that sees only
               a few neighbouring codes): a likelihood ratio. Texture is as hard for both, so it cancels; what
               stays is what only the global context finds unlikely;
  restoration  |x - mean restoration|: the codes the prior finds unlikely are resampled in raster order with
               the cached sampler, keeping every other code, several times; the mean decoded restoration is
               what a healthy brain would look like there.

A method (``Settings``) names the components it combines. Each component is scaled by its healthy-slice
statistics (0 at the median, 1 at the 99th percentile of healthy validation brain pixels), the scaled maps are
combined by their maximum, and the result is masked to the brain. The image score is a high quantile, inside the
brain, of that map or of the scaled maps' sum (``Settings.image_rule``), reported as a percentile of healthy
validation slices' scores.

Settings, scales and healthy scores come from ``bench/anomaly.py``, which chooses them on validation slices and
writes them to ``calibration.json`` beside the local prior (``checkpoints/anomaly/``).

    python -m brainvq.anomaly --checkpoints checkpoints --images DIR --out OUT_DIR --json scores.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from brainvq import data
from brainvq.io import atomic_write_bytes, atomic_write_json
from brainvq.lesions import brain_mask
from brainvq.pixelcnn import GatedPixelCNN, code_nll
from brainvq.sampling import BatchSampler
from brainvq.vqvae import VQVAE

COMPONENTS = ("recon", "nll", "surprise", "ratio", "restoration")
RULES = ("max", "sum")                  # how scaled components combine
ANOMALY_DIR = "anomaly"                 # inside a checkpoints folder: local/ (the local prior), calibration.json
SCORING_DIR = "prior"                   # inside anomaly/, optional: the prior that judges slices (scoring_prior)
CALIBRATION_NAME = "calibration.json"
CALIBRATE = ("Create one with `python bench/anomaly.py --checkpoints {folder} --data-dir DATA` (it sets the "
             "anomaly settings on validation slices and writes {folder}/anomaly/calibration.json).")
LN2 = float(np.log(2))


class AnomalyError(ValueError):
    """Models or inputs the anomaly maps cannot use; the message says how to fix it."""


def fingerprint(model: torch.nn.Module) -> str:
    """Hash of all a model's weights: a calibration holds only for the exact models it was measured on (a VQ-VAE's
    own ``fingerprint`` hashes the codebook alone, which a decoder fine-tune leaves unchanged)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprints(vqvae: torch.nn.Module, prior: torch.nn.Module) -> dict[str, str]:
    """What a calibration or the upload check's limits are tied to: hashes of all the VQ-VAE's weights (decoder
    included) and the prior's."""
    return {"vqvae": fingerprint(vqvae), "prior": fingerprint(prior)}


# ----------------------------------------------------------------------------- settings and calibration


@dataclass
class Settings:
    """One anomaly method: which components it combines, how each is smoothed, how a slice is scored."""

    components: tuple[str, ...] = ("recon", "surprise", "ratio")
    sigma: dict[str, float] = field(default_factory=lambda: {"recon": 4.0, "nll": 8.0, "surprise": 8.0,
                                                             "ratio": 8.0, "restoration": 8.0})
    image_quantile: float = 0.999      # the image score: this quantile, inside the brain, of ...
    image_rule: str = "max"            # ... the scaled components combined by "max" (the map itself) or "sum"
    restore_fraction: float = 0.05     # resample the codes whose surprise exceeds that of this share of healthy codes
    restore_dilation: int = 1          # ... grown by this many codes, so a lesion's inside goes too
    restorations: int = 2              # restorations averaged

    def __post_init__(self):
        self.components = tuple(self.components)
        unknown = set(self.components) - set(COMPONENTS)
        if unknown or not self.components:
            raise AnomalyError(f"components must be a non-empty subset of {COMPONENTS}, not {self.components}")
        if self.image_rule not in RULES:
            raise AnomalyError(f"image_rule must be one of {RULES}, not {self.image_rule!r}")


@dataclass
class Calibration:
    """A method's settings plus the healthy validation statistics that scale its maps and rank its scores."""

    settings: Settings
    models: dict[str, str | None]                          # fingerprints of vqvae, prior, local
    scales: dict[str, tuple[float, float]]                 # component -> (median, 99th percentile), healthy brain
    healthy_scores: list[float]                            # image scores of healthy validation slices, sorted
    restore_threshold: float                               # surprise (bits) above which a code is resampled
    pixel_threshold: float = 1.0                           # map value with the best Dice on validation lesions
    notes: dict = field(default_factory=dict)              # how it was made (data, seeds, counts)

    def percentile(self, score: float) -> float:
        """Share of healthy validation slices (in %) that score at or below ``score``."""
        return 100.0 * float(np.searchsorted(self.healthy_scores, score, side="right")) / len(self.healthy_scores)

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        try:
            raw = json.loads(Path(path).read_text())
            raw["settings"] = Settings(**raw["settings"])
            raw["scales"] = {k: tuple(v) for k, v in raw["scales"].items()}
            return cls(**raw)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise AnomalyError(f"{str(path)!r} is not a readable anomaly calibration ({error}).") from error


# ----------------------------------------------------------------------------- maps


@dataclass
class Analysis:
    """One slice's anomaly maps; every image is the 256x256 padded frame."""

    image: np.ndarray                      # float32 input in [0,1]
    brain: np.ndarray                      # bool brain mask (brainvq.lesions.brain_mask)
    recon: np.ndarray                      # float32 VQ-VAE reconstruction
    codes: np.ndarray                      # (h,w) code indices
    nll: np.ndarray                        # (h,w) the prior's NLL per code, bits
    surprise: np.ndarray                   # (h,w) NLL minus the entropy of the prior's prediction, bits
    components: dict[str, np.ndarray]      # unscaled component maps over the whole frame
    restoration: np.ndarray | None         # mean restoration, when computed
    map: np.ndarray                        # the anomaly map: scaled components combined, >= 0, 0 outside the brain
    score: float                           # image score
    percentile: float                      # of healthy validation slices scoring at most ``score``


def to_pixels(code_map: torch.Tensor, size: int, sigma: float) -> np.ndarray:
    """(B,h,w) per-code values -> (B,size,size) pixels: bilinear upsampling, then Gaussian smoothing."""
    up = F.interpolate(code_map[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return smooth(up.numpy(), sigma)


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of each (H,W) map of a (B,H,W) stack (sigma in pixels; 0 leaves it as it is)."""
    maps = np.asarray(maps, dtype=np.float32)
    return np.stack([ndimage.gaussian_filter(m, sigma) for m in maps]) if sigma else maps


def code_mask(brain: np.ndarray, grid: int) -> np.ndarray:
    """(B,H,W) pixel masks -> (B,grid,grid): a code is in the brain when any pixel of its patch is."""
    b, h, w = brain.shape
    return brain.reshape(b, grid, h // grid, grid, w // grid).any((2, 4))


def scale(raw: np.ndarray, median: float, high: float) -> np.ndarray:
    """0 at the healthy median, 1 at the healthy 99th percentile."""
    return (raw - median) / max(high - median, 1e-8)


def combine(components: dict[str, np.ndarray], brain: np.ndarray, scales: dict[str, tuple[float, float]],
            names: Sequence[str], rule: str = "max") -> np.ndarray:
    """The scaled components ``names`` combined at each pixel by their maximum (the anomaly map) or their sum,
    clipped at 0, 0 outside the brain (maps and brain of one slice, or stacks of them)."""
    scaled = [scale(components[name], *scales[name]) for name in names]
    combined = np.maximum.reduce(scaled) if rule == "max" else np.add.reduce(scaled)
    return np.where(brain, np.maximum(combined, 0.0), 0.0).astype(np.float32)


def image_score(anomaly_map: np.ndarray, brain: np.ndarray, quantile: float) -> float:
    """A high quantile of the map inside the brain (0 for a slice without brain)."""
    return float(np.quantile(anomaly_map[brain], quantile)) if brain.any() else 0.0


def slice_score(components: dict[str, np.ndarray], brain: np.ndarray, scales: dict[str, tuple[float, float]],
                settings: Settings) -> float:
    """A slice's image score by ``settings``: its quantile of the components combined by its image rule."""
    combined = combine(components, brain, scales, settings.components, settings.image_rule)
    return image_score(combined, brain, settings.image_quantile)


def fit_scales(components: Sequence[dict[str, np.ndarray]], brains: Sequence[np.ndarray]) -> dict[str, tuple[float, float]]:
    """(median, 99th percentile) of each component over the brain pixels of healthy slices."""
    names = components[0].keys()
    return {name: tuple(float(v) for v in np.quantile(
        np.concatenate([c[name][b] for c, b in zip(components, brains)]), [0.5, 0.99])) for name in names}


class Detector:
    """The VQ-VAE, its prior, an optional local-context prior and the calibration of the anomaly method."""

    def __init__(self, vqvae: VQVAE, prior: GatedPixelCNN, local: GatedPixelCNN | None = None,
                 calibration: Calibration | None = None, calibration_problem: str | None = None):
        self.vqvae, self.prior, self.local = vqvae.eval(), prior.eval(), local.eval() if local is not None else None
        self.calibration, self.calibration_problem = calibration, calibration_problem
        if calibration is not None:
            expected = self.fingerprints()
            if calibration.models != expected:
                self.calibration = None
                self.calibration_problem = ("the anomaly calibration was measured on other models "
                                            f"({calibration.models}, loaded: {expected})")

    def fingerprints(self) -> dict[str, str | None]:
        return {**model_fingerprints(self.vqvae, self.prior),
                "local": fingerprint(self.local) if self.local is not None else None}

    @classmethod
    def load(cls, folder: str | os.PathLike, vqvae: VQVAE | None = None,
             prior: GatedPixelCNN | None = None) -> "Detector":
        """Models from a checkpoints folder (vqvae/, the scoring prior, anomaly/local/, anomaly/calibration.json);
        ``vqvae`` and ``prior`` (the scoring prior: a bundle's ``scorer``) given: use those, the demo's loaded
        models, with the folder's anomaly/ files."""
        folder = Path(folder)
        vqvae = vqvae or VQVAE.from_pretrained(folder / "vqvae")
        prior = prior or scoring_prior(folder, vqvae)
        local_dir, path = folder / ANOMALY_DIR / "local", folder / ANOMALY_DIR / CALIBRATION_NAME
        local = GatedPixelCNN.from_pretrained(local_dir, vqvae=vqvae) if local_dir.is_dir() else None
        calibration, problem = None, None
        if path.is_file():
            calibration = Calibration.load(path)
        else:
            problem = f"{str(path)!r} does not exist"
        return cls(vqvae, prior, local, calibration, problem)

    def require_calibration(self, folder: str | os.PathLike = "checkpoints") -> Calibration:
        if self.calibration is None:
            raise AnomalyError(f"These models have no anomaly calibration: {self.calibration_problem}. "
                               + CALIBRATE.format(folder=folder))
        return self.calibration

    @torch.no_grad()
    def measure(self, images: np.ndarray, names: Sequence[str], settings: Settings,
                restore_threshold: float | None = None, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> list[Analysis]:
        """The named component maps of a (B,256,256) float batch in [0,1] (no map or score yet).

        Restoration (when named) resamples the codes whose surprise exceeds ``restore_threshold`` bits, grown by
        ``settings.restore_dilation``, ``settings.restorations`` times per slice, slice ``k`` with seed
        ``seed + k``; ``progress(done, total)`` follows the sampler.
        """
        names = list(dict.fromkeys(names))
        if "ratio" in names and self.local is None:
            raise AnomalyError("The 'ratio' component needs a local-context prior (checkpoints/anomaly/local).")
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3 or images.shape[1:] != (data.IMAGE_SIZE, data.IMAGE_SIZE):
            raise AnomalyError(f"images must be (B,{data.IMAGE_SIZE},{data.IMAGE_SIZE}), not {images.shape}")
        size, grid = images.shape[-1], self.prior.cfg.grid_size
        device = next(self.vqvae.parameters()).device
        x = torch.from_numpy(images)[:, None].to(device)
        codes = self.vqvae.encode(x)
        recon = self.vqvae.decode(codes).clamp(0, 1)[:, 0].float().cpu()
        log_p = self.prior(codes).float().log_softmax(1)
        nll = -log_p.gather(1, codes[:, None])[:, 0].cpu() / LN2
        surprise = nll - (-(log_p.exp() * log_p).sum(1)).cpu() / LN2
        brains = np.stack([brain_mask(image) for image in images])
        raw: dict[str, np.ndarray] = {}
        if "recon" in names:
            raw["recon"] = smooth(np.abs(images - recon.numpy()), settings.sigma["recon"])
        if "nll" in names:
            raw["nll"] = to_pixels(nll, size, settings.sigma["nll"])
        if "surprise" in names:
            raw["surprise"] = to_pixels(surprise, size, settings.sigma["surprise"])
        if "ratio" in names:
            local_nll = code_nll(self.local(codes), codes).cpu() / LN2
            raw["ratio"] = to_pixels(nll - local_nll, size, settings.sigma["ratio"])
        restored = None
        if "restoration" in names:
            if restore_threshold is None:
                restore_threshold = self.require_calibration().restore_threshold
            unlikely = (surprise.numpy() > restore_threshold) & code_mask(brains, grid)
            if settings.restore_dilation:
                unlikely = np.stack([ndimage.binary_dilation(u, iterations=settings.restore_dilation) for u in unlikely])
            unlikely &= code_mask(brains, grid)
            restored = self.restore(codes.cpu(), torch.from_numpy(unlikely), settings.restorations, seed, progress)
            raw["restoration"] = smooth(np.abs(images - restored), settings.sigma["restoration"])
        return [Analysis(images[k], brains[k], recon[k].numpy(), codes[k].cpu().numpy(), nll[k].numpy(),
                         surprise[k].numpy(),
                         {name: raw[name][k] for name in names},
                         restored[k] if restored is not None else None, None, None, None)
                for k in range(len(images))]

    @torch.no_grad()
    def restore(self, codes: torch.Tensor, unlikely: torch.Tensor, count: int, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Mean decoded restoration of each (h,w) grid: its ``unlikely`` codes resampled in raster order by the
        cached sampler, every other code kept; ``count`` restorations each, grid ``k`` from seed ``seed + k``."""
        sampler = BatchSampler(self.prior)
        requests = [sampler.add(count, seed=seed + k, known=torch.where(u, -1, c))
                    for k, (c, u) in enumerate(zip(codes, unlikely))]
        total = codes.shape[-1] * codes.shape[-2]
        while sampler.busy:
            sampler.step()
            if progress is not None:
                progress(requests[0].filled, total)
        decoded = self.vqvae.decode(torch.cat([r.codes for r in requests]).to(next(self.vqvae.parameters()).device))
        return decoded.clamp(0, 1).float().cpu().view(len(codes), count, *decoded.shape[-2:]).mean(1).numpy()

    def analyze(self, images: np.ndarray, seed: int = 0, restore: bool = False,
                progress: Callable[[int, int], None] | None = None) -> list[Analysis]:
        """Anomaly maps and image scores of a (B,256,256) float batch by the calibrated method (and the
        restoration too when ``restore``, for display)."""
        calibration = self.require_calibration()
        settings = calibration.settings
        names = list(settings.components) + ["nll"] + (["restoration"] if restore else [])
        results = self.measure(images, names, settings, calibration.restore_threshold, seed, progress)
        for result in results:
            result.map = combine(result.components, result.brain, calibration.scales, settings.components)
            result.score = slice_score(result.components, result.brain, calibration.scales, settings)
            result.percentile = calibration.percentile(result.score)
        return results


def scoring_prior(folder: str | os.PathLike, vqvae: VQVAE, prior: GatedPixelCNN | None = None) -> GatedPixelCNN:
    """The prior that judges slices (anomaly maps, the upload check): ``folder``/anomaly/prior when there is one,
    else ``prior`` when given, else ``folder``/pixelcnn. A separate one can be trained for judging, for example on
    zoomed slices so that brains of other sizes are not unlikely for their size alone, while pixelcnn/ samples
    brains of the training slices' sizes."""
    folder = Path(folder)
    if (folder / ANOMALY_DIR / SCORING_DIR).is_dir():
        return GatedPixelCNN.from_pretrained(folder / ANOMALY_DIR / SCORING_DIR, vqvae=vqvae)
    if prior is not None:
        return prior
    if not (folder / "pixelcnn").is_dir():
        raise AnomalyError(f"{str(folder)!r} has no pixelcnn/ prior: anomaly maps need the prior.")
    return GatedPixelCNN.from_pretrained(folder / "pixelcnn", vqvae=vqvae)


# ----------------------------------------------------------------------------- calibration


def restore_threshold(healthy: Sequence[Analysis], fraction: float) -> float:
    """The surprise (bits) that only ``fraction`` of the healthy slices' brain codes exceed."""
    values = [a.surprise[code_mask(a.brain[None], a.surprise.shape[0])[0]] for a in healthy]
    return float(np.quantile(np.concatenate(values), 1 - fraction))


def calibrate(healthy: Sequence[Analysis], settings: Settings, models: dict[str, str | None], threshold: float,
              scales: dict[str, tuple[float, float]] | None = None, pixel_threshold: float = 1.0,
              notes: dict | None = None) -> Calibration:
    """The healthy image scores of ``settings`` from healthy slices measured with its components; the scales
    too unless given (measured on other healthy slices)."""
    scales = scales or fit_scales([{n: a.components[n] for n in settings.components} for a in healthy],
                                  [a.brain for a in healthy])
    scales = {n: scales[n] for n in settings.components}
    calibration = Calibration(settings, models, scales, [], threshold, pixel_threshold, notes or {})
    calibration.healthy_scores = sorted(slice_score(a.components, a.brain, scales, settings) for a in healthy)
    return calibration


# ----------------------------------------------------------------------------- command line


def _key(path: Path, root: Path) -> str:
    """STEM for a file directly under ``root``; sub-folders join the name with '__' (class folders may repeat names)."""
    return "__".join(path.relative_to(root).with_suffix("").parts)


def main(argv: list[str] | None = None) -> dict[str, float]:
    from tqdm import tqdm

    from brainvq.demo import UploadError, prepare_upload

    parser = argparse.ArgumentParser(description="Anomaly maps of every PNG or JPEG under a folder.",
                                     epilog="Writes OUT/<STEM>.npy (float32 256x256 map of the padded frame, higher = "
                                            "more anomalous, 0 outside the brain) and --json {STEM: image score}. "
                                            "Files in sub-folders are named <sub>__<STEM>.")
    parser.add_argument("--checkpoints", default="checkpoints", help="folder with vqvae/, pixelcnn/ and anomaly/")
    parser.add_argument("--images", required=True, help="folder searched recursively for .png/.jpg/.jpeg")
    parser.add_argument("--out", required=True, help="folder for the .npy maps")
    parser.add_argument("--json", required=True, help="where to write {STEM: image score}")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    root = Path(args.images)
    if not root.is_dir():
        parser.error(f"--images {str(root)!r} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in data.IMAGE_SUFFIXES and p.is_file())
    if not files:
        parser.error(f"no PNG or JPEG files under {str(root)!r}")
    detector = Detector.load(args.checkpoints)
    detector.require_calibration(args.checkpoints)
    out = Path(args.out)
    scores: dict[str, float] = {}
    skipped: list[str] = []
    for start in tqdm(range(0, len(files), args.batch_size), desc="anomaly maps", unit="batch"):
        batch, keys = [], []
        for path in files[start:start + args.batch_size]:
            try:
                batch.append(prepare_upload(path)[0].astype(np.float32) / 255.0)
                keys.append(_key(path, root))
            except UploadError as error:
                skipped.append(f"{path}: {error}")
        for key, result in zip(keys, detector.analyze(np.stack(batch)) if batch else []):
            atomic_write_bytes(out / f"{key}.npy", lambda f, m=result.map: np.save(f, m, allow_pickle=False))
            scores[key] = result.score
    for line in skipped:
        print(f"skipped {line}")
    atomic_write_json(args.json, scores)
    print(f"{len(scores)} maps in {out}/, scores in {args.json}" + (f"; {len(skipped)} skipped" if skipped else ""))
    return scores


if __name__ == "__main__":
    main()

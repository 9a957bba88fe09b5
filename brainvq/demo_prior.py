"""The demo's Anomaly and Complete tabs: the prior used as a tool (the UI is wired in app.py).

Anomaly: a slice (optionally with a synthetic lesion, brainvq.lesions) -> original | the prior's NLL per code |
a restoration | the anomaly map over the slice (brainvq.anomaly), with the image score as a percentile of healthy
validation slices. Complete: keep part of a slice's code grid (the top rows, or everything outside a box) and
let the prior fill in the rest, several times; the kept codes stay as they were.
Both stream their progress: a restoration and a completion each run the sampler over the whole grid.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from matplotlib import colormaps
from scipy import ndimage

from brainvq import anomaly, data, lesions
from brainvq.demo import DemoError, WeakMemo, require_bundle
from brainvq.generation import check_generation, code_look
from brainvq.sampling import sample
from brainvq.visualize import to_uint8

MODES = ("top rows", "outside a box")
MAX_COMPLETIONS = 8
FRAME_ROWS = 4                     # a completion frame every this many code rows


class PriorToolError(DemoError):
    """An Anomaly or Complete request that cannot be served; the message is for the user."""


def _make_detector(bundle) -> anomaly.Detector:
    if bundle.folder is None:
        return anomaly.Detector(bundle.vqvae, bundle.scorer, calibration_problem="the models have no folder")
    return anomaly.Detector.load(bundle.folder, bundle.vqvae, bundle.scorer)


_detectors = WeakMemo(_make_detector)


def detector_for(bundle) -> anomaly.Detector:
    """The anomaly detector of a loaded bundle (its scoring prior and anomaly/ folder: local prior, calibration),
    made once."""
    bundle = require_bundle(bundle)
    if bundle.prior is None:
        raise PriorToolError("These models have no PixelCNN prior: anomaly maps and completion need it. Load a "
                             "bundle with a pixelcnn/ folder in the Models tab.")
    return _detectors(bundle)


def _seed(seed) -> int:
    try:
        value = float(seed)
    except (TypeError, ValueError):
        raise PriorToolError(f"The seed must be a whole number, not {seed!r}.") from None
    if not math.isfinite(value) or value != int(value) or not 0 <= value < 2**63:
        raise PriorToolError(f"The seed must be a whole number between 0 and 2^63 - 1, not {seed!r}.")
    return int(value)


def _as_slice(image: np.ndarray | None) -> np.ndarray:
    if image is None:
        raise PriorToolError("Pick a slice or upload one first.")
    image = np.asarray(image)
    if image.shape != (data.IMAGE_SIZE, data.IMAGE_SIZE):
        raise PriorToolError(f"A slice must be {data.IMAGE_SIZE}x{data.IMAGE_SIZE}, not {image.shape}.")
    return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)


def _grey(image: np.ndarray) -> np.ndarray:
    return np.repeat(to_uint8(torch.from_numpy(np.asarray(image, dtype=np.float32)))[..., None], 3, -1)


def _coloured(values: np.ndarray, cmap: str, top: float) -> np.ndarray:
    return (colormaps[cmap](np.clip(values / max(top, 1e-8), 0, 1))[..., :3] * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- anomaly


@dataclass
class AnomalyView:
    """The Anomaly tab's four panels and what they say."""

    original: np.ndarray            # uint8 RGB: the slice, the synthetic lesion outlined in green
    nll: np.ndarray                 # uint8 RGB: the prior's NLL per code (bits) inside the brain
    restoration: np.ndarray         # uint8 grey: the mean restoration
    overlay: np.ndarray             # uint8 RGB: the anomaly map over the slice, above the overlay threshold
    score: float
    percentile: float
    lesion: str | None              # what was added, or None
    dice: float | None              # Dice of the thresholded map with the synthetic lesion

    def summary(self) -> str:
        lines = [f"**Image score {self.score:.2f}**: higher than {self.percentile:.0f}% of healthy validation "
                 "slices" if self.percentile < 100 else f"**Image score {self.score:.2f}**: higher than every "
                 "healthy validation slice"]
        if self.lesion:
            lines.append(f"Synthetic lesion: {self.lesion} (outlined in green); Dice of the coloured region "
                         f"with it: {self.dice:.2f}.")
        return "\n\n".join(lines)


def add_lesion(image: np.ndarray, kind: str, size: str, seed: int) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """The slice with a synthetic lesion (kind "none": unchanged), its mask and a description."""
    image = _as_slice(image)
    if kind in (None, "", "none"):
        return image, None, None
    try:
        lesion = lesions.add_lesion(image, kind, size, np.random.default_rng(_seed(seed)))
    except ValueError as error:
        raise PriorToolError(f"Cannot add a lesion: {error}.") from None
    return lesion.image, lesion.mask, f"{kind}, {size} (radius {lesion.radius} px, centre at row {lesion.center[0]}, " \
                                      f"column {lesion.center[1]})"


def anomaly_view(result: anomaly.Analysis, calibration: anomaly.Calibration, mask: np.ndarray | None,
                 lesion: str | None) -> AnomalyView:
    original = _grey(result.image)
    if mask is not None:
        original[mask & ~ndimage.binary_erosion(mask)] = (0, 255, 0)
    nll = anomaly.to_pixels(torch.from_numpy(result.nll)[None], result.image.shape[-1], 0)[0]
    inside = np.where(result.brain, nll, 0.0)
    nll_rgb = _coloured(inside, "magma", float(np.quantile(nll[result.brain], 0.99)) if result.brain.any() else 1)
    threshold = calibration.pixel_threshold
    overlay = _grey(result.image)
    hot = result.map >= threshold
    colours = _coloured(result.map - threshold, "autumn_r", max(threshold, float(result.map.max()) - threshold))
    overlay[hot] = (0.4 * overlay[hot] + 0.6 * colours[hot]).astype(np.uint8)
    dice = None
    if mask is not None:
        dice = float(2 * (hot & mask).sum() / max(1, hot.sum() + mask.sum()))
    return AnomalyView(original, nll_rgb, _grey(result.restoration), overlay, result.score, result.percentile,
                       lesion, dice)


def analyze_stream(bundle, image: np.ndarray, kind: str = "none", size: str = "medium",
                   seed: int = 0) -> Iterator[tuple[AnomalyView | None, str]]:
    """(view or None, status) while the restoration runs, then the finished view."""
    detector = detector_for(bundle)
    try:
        calibration = detector.require_calibration()
    except anomaly.AnomalyError as error:
        raise PriorToolError(str(error)) from None
    x, mask, lesion = add_lesion(image, kind, size, seed)
    done: dict = {}
    progress = {"filled": 0, "total": 1}

    def work() -> None:
        try:
            done["result"] = detector.analyze(x[None], seed=0, restore=True, progress=lambda f, t: progress.update(
                filled=f, total=t))[0]
        except Exception as error:  # noqa: BLE001 - reported to the user below
            done["error"] = error

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        if thread.is_alive():
            yield None, (f"Restoring the unlikely codes… {100 * progress['filled'] // max(1, progress['total'])}% "
                         f"of the grid ({calibration.settings.restorations} restorations)")
    if "error" in done:
        raise PriorToolError(f"The anomaly map failed ({type(done['error']).__name__}: {done['error']}).")
    yield anomaly_view(done["result"], calibration, mask, lesion), "Done."


# ----------------------------------------------------------------------------- completion


def keep_mask(grid: int, mode: str, keep_rows: float = 0.5, box: tuple[int, int, int, int] = (96, 96, 160, 160),
              image_size: int = data.IMAGE_SIZE) -> np.ndarray:
    """(grid,grid) bool: True where a code is kept. ``keep_rows``: the share of rows kept from the top;
    ``box``: (top, left, bottom, right) in pixels of the frame, whose codes are filled in."""
    if mode == "top rows":
        if not 0 < keep_rows < 1:
            raise PriorToolError(f"The share of rows to keep must be between 0 and 1 (exclusive), not {keep_rows}.")
        keep = np.zeros((grid, grid), dtype=bool)
        keep[:max(1, round(keep_rows * grid))] = True
        return keep
    if mode != "outside a box":
        raise PriorToolError(f"What to keep must be one of {MODES}, not {mode!r}.")
    try:
        top, left, bottom, right = (int(v) for v in box)
    except (TypeError, ValueError):
        raise PriorToolError(f"The box must be four whole numbers (top, left, bottom, right), not {box!r}.") from None
    if not (0 <= top < bottom <= image_size and 0 <= left < right <= image_size):
        raise PriorToolError(f"The box must satisfy 0 <= top < bottom <= {image_size} and 0 <= left < right <= "
                             f"{image_size}; got top {top}, left {left}, bottom {bottom}, right {right}.")
    patch = image_size // grid
    keep = np.ones((grid, grid), dtype=bool)
    keep[top // patch:-(-bottom // patch), left // patch:-(-right // patch)] = False
    return keep


@dataclass
class CompletionFrame:
    """original | kept part | the completions so far (decoded; not yet sampled codes shown as background)."""

    original: np.ndarray           # uint8 grey
    kept: np.ndarray               # uint8 RGB: the kept codes decoded, the part to fill tinted blue
    completions: list[np.ndarray]  # uint8 grey, one per completion
    filled: int
    total: int
    codes: np.ndarray              # (n,h,w) codes so far, -1 where not sampled yet

    @property
    def done(self) -> bool:
        return self.filled == self.total

    def status(self) -> str:
        if self.done:
            return f"Done: {len(self.completions)} completion(s); every kept code is unchanged."
        return f"Filling in… {self.filled:,} of {self.total:,} positions ({100 * self.filled // self.total}%)"


@torch.no_grad()
def complete_stream(bundle, image: np.ndarray, mode: str = "top rows", keep_rows: float = 0.5,
                    box: tuple[int, int, int, int] = (96, 96, 160, 160), n: int = 4, temperature: float = 1.0,
                    seed: int = 0) -> Iterator[CompletionFrame]:
    """Keep part of the slice's code grid and sample the rest ``n`` times; a frame every few rows."""
    bundle = require_bundle(bundle)
    if bundle.prior is None:
        raise PriorToolError("These models have no PixelCNN prior, so they cannot complete a slice.")
    x = _as_slice(image)
    n, temperature, _, _, seed = check_generation(n, temperature, 0, 1.0, seed, bundle.vqvae.cfg.num_codes)
    if n > MAX_COMPLETIONS:
        raise PriorToolError(f"At most {MAX_COMPLETIONS} completions at once, not {n}.")
    vqvae, prior = bundle.vqvae, bundle.prior
    device = next(vqvae.parameters()).device
    codes = vqvae.encode(torch.from_numpy(x)[None, None].to(device))[0].cpu()
    keep = torch.from_numpy(keep_mask(codes.shape[-1], mode, keep_rows, box))
    known = torch.where(keep, codes, -1)
    neutral = code_look(vqvae).neutral
    kept = _grey(vqvae.decode(known.masked_fill(~keep, neutral)[None].to(device))[0, 0].cpu().numpy())
    scale = data.IMAGE_SIZE // codes.shape[-1]
    hidden = (~keep).numpy().repeat(scale, 0).repeat(scale, 1)
    kept[hidden] = (0.5 * kept[hidden] + 0.5 * np.array([60, 90, 200])).astype(np.uint8)
    original = _grey(x)[..., 0]
    size = codes.shape[-1]
    for progress in sample(prior, n, temperature, seed=seed, known=known, every=FRAME_ROWS * size):
        grids = progress.codes.masked_fill(progress.codes < 0, neutral).to(device)
        decoded = [to_uint8(image) for image in vqvae.decode(grids)]
        yield CompletionFrame(original, kept, decoded, progress.filled, progress.total, progress.codes.numpy())

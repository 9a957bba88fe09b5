"""The demo's logic, independent of any UI: uploads, reconstruction, browsing, models (generation: brainvq.generation).

``app.py`` only wires these functions to Gradio components. Everything here takes and returns plain numpy
arrays, strings and dataclasses, and raises ``DemoError`` subclasses (all ``ValueError``) whose messages are
written for the person using the demo.
"""
from __future__ import annotations

import json
import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from brainvq import data, slicecheck
from brainvq.lesions import brain_mask
from brainvq.metrics import psnr as _psnr
from brainvq.metrics import ssim as _ssim
from brainvq.visualize import colorize_codes, to_uint8

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO_ROOT / "assets" / "samples"

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000
SMALL_SIDE = 16            # smaller images are still processed, with a note that the result means little
GALLERY_LIMIT = 48         # slices shown at once in the Browse gallery
SUPPORTED = "PNG, JPEG, GIF, BMP, TIFF or WebP"


class DemoError(ValueError):
    """A request the demo cannot serve, with a message meant for the user (never a stack trace)."""


class UploadError(DemoError):
    """An uploaded file that cannot be turned into a slice."""


class GenerationError(DemoError):
    """Generation settings out of range, or no prior to sample from."""


class NoModelError(DemoError):
    """No models are loaded yet."""


# ----------------------------------------------------------------------------- uploads


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB"


def prepare_upload(path: str | os.PathLike | None,
                   upload_root: str | os.PathLike | None = None) -> tuple[np.ndarray, list[str]]:
    """Read an uploaded image file into a uint8 256x256 slice, plus notes on what was done to it.

    With ``upload_root`` (the server's upload folder) any path outside it is refused with the same message
    as a missing file: defence in depth, as Gradio itself refuses input paths that were not uploaded.

    Accepts any format and mode Pillow decodes (PNG, JPEG, GIF and TIFF first frame, BMP, WebP, 16-bit,
    RGBA, palette, ...). Raises ``UploadError`` for a missing, empty, oversized or non-image file and for
    images over ``MAX_PIXELS`` (decompression bombs are refused from the header, before decoding). Images
    with a side under ``SMALL_SIDE`` pixels are processed, with a note that the result is mostly padding.
    """
    if path is None or str(path) == "":
        raise UploadError("No file was uploaded: choose an image file.")
    path = Path(path)
    gone = UploadError("The uploaded file could not be read; please upload it again.")
    if upload_root is not None and not _inside(path, Path(upload_root)):
        raise gone
    try:
        size = path.stat().st_size
    except OSError:
        raise gone from None
    if not path.is_file():
        raise UploadError("The upload is not a file; please upload an image file.")
    if size == 0:
        raise UploadError("The uploaded file is empty (0 bytes); it is not an image.")
    if size > MAX_UPLOAD_BYTES:
        raise UploadError(f"The uploaded file is {_mb(size)}; the limit is {_mb(MAX_UPLOAD_BYTES)}. "
                          "Upload a smaller image (a brain slice needs only 256x256 pixels).")
    try:
        # Image.open reads the header only; PIL raises DecompressionBombError past 2x its own limit, and
        # our MAX_PIXELS check refuses anything bigger before a single pixel is decoded.
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise UploadError(_too_many_pixels(width, height))
            notes = [f"read a {width}x{height} {image.format or 'image'} ({image.mode})"]
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                image.seek(0)
                notes.append(f"used the first of its {frames} frames")
            image.load()
            if image.getexif().get(0x0112, 1) != 1:
                image = ImageOps.exif_transpose(image)
                notes.append("rotated it upright following its EXIF orientation tag")
                width, height = image.size
            if min(width, height) < SMALL_SIDE:
                notes.append(f"warning: it is very small ({width}x{height}), so the slice is mostly black "
                             "padding and its reconstruction says little about the model")
            slice_, converted = data.to_slice(image)
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(_too_many_pixels(None, None)) from None
    except UnidentifiedImageError:
        raise UploadError(f"This file is not an image that can be read (expected {SUPPORTED}). "
                          "PDFs, DICOM/NIfTI volumes and other documents are not supported.") from None
    except Exception as error:  # noqa: BLE001 - Pillow raises many types (TypeError, struct.error, ...) on damaged files
        raise UploadError(f"This image could not be decoded: it may be truncated, corrupt or use an unusual "
                          f"encoding ({type(error).__name__}: {error}). Try re-saving it as PNG.") from None
    notes.extend(converted)
    if len(notes) == 1:
        notes.append("already a 256x256 grayscale slice: used as is")
    return slice_, notes


def _inside(path: Path, root: Path) -> bool:
    try:
        path, root = path.resolve(), root.resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return path != root and root in path.parents


def _too_many_pixels(width: int | None, height: int | None) -> str:
    dims = f"{width}x{height} = {width * height:,} pixels" if width and height else "too many pixels"
    return (f"The image is too large ({dims}); the limit is {MAX_PIXELS:,} pixels. "
            "Downscale it before uploading (a brain slice needs only 256x256 pixels).")


# ----------------------------------------------------------------------------- reconstruction


@dataclass
class Reconstruction:
    """original | code grid | reconstruction, with the SSIM and PSNR of the reconstruction."""

    original: np.ndarray    # uint8 (256,256)
    codes: np.ndarray       # int64 (h,w) code indices
    code_grid: np.ndarray   # uint8 (256,256,3)
    recon: np.ndarray       # uint8 (256,256)
    ssim: float
    psnr: float
    ssim_brain: float | None = None         # SSIM over the brain's bounding box (None: no brain found)
    check: slicecheck.Verdict | None = None  # does it look like an axial brain slice the models know?
    check_note: str | None = None            # why there is no check

    def summary(self) -> str:
        brain = f" · {self.ssim_brain:.4f} over the brain" if self.ssim_brain is not None else " · no brain found"
        return f"SSIM {self.ssim:.4f} whole frame{brain} · PSNR {self.psnr:.2f} dB"

    def check_markdown(self) -> str:
        """The upload check's verdict, for the page."""
        if self.check is None:
            return f"*Not checked: {self.check_note}.*"
        if self.check.ok:
            return "✅ Looks like an axial brain slice of the kind the models know."
        return ("⚠️ **This does not look like an axial brain slice of the kind the models know:** "
                + "; ".join(self.check.reasons) + ". It is reconstructed anyway, but the result says little.")


def require_bundle(bundle):
    if bundle is None:
        raise NoModelError("No models are loaded. Load a checkpoint folder or a Hub repository in the Models tab.")
    return bundle


K, V = TypeVar("K"), TypeVar("V")


class WeakMemo(Generic[K, V]):
    """``make(key)`` made on first use for each key object (a loaded bundle, a model) and dropped with the key, for
    what depends only on the models: requests then neither re-read files nor re-hash weights. Thread-safe."""

    def __init__(self, make: Callable[[K], V]):
        self._make = make
        self._values: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __call__(self, key: K) -> V:
        with self._lock:
            if key not in self._values:
                self._values[key] = self._make(key)
            return self._values[key]


upload_limits = WeakMemo(lambda bundle: slicecheck.limits_for(bundle.folder, bundle.vqvae, bundle.scorer))


def reconstruct(bundle, slice_uint8: np.ndarray) -> Reconstruction:
    """Encode a uint8 256x256 slice to codes and decode it back; SSIM uses brainvq.metrics' one definition."""
    vqvae = require_bundle(bundle).vqvae
    original = np.ascontiguousarray(slice_uint8, dtype=np.uint8)
    if original.shape != (data.IMAGE_SIZE, data.IMAGE_SIZE):
        raise DemoError(f"A slice must be {data.IMAGE_SIZE}x{data.IMAGE_SIZE}, not {original.shape}.")
    device = next(vqvae.parameters()).device
    x = torch.from_numpy(original.astype(np.float32) / 255.0)[None, None].to(device)
    with torch.no_grad():
        codes = vqvae.encode(x)
        recon = vqvae.decode(codes).clamp(0, 1).float()
    score = float(_ssim(recon, x, per_image=True)[0])
    peak = float(_psnr(recon, x)[0])
    grid = colorize_codes(codes[0], vqvae.cfg.num_codes, size=data.IMAGE_SIZE)
    result = Reconstruction(original, codes[0].cpu().numpy(), grid, to_uint8(recon[0]), score, peak)
    image, brain = x[0, 0].cpu().numpy(), brain_mask(x[0, 0].cpu().numpy())
    limits, result.check_note = (upload_limits(bundle) if bundle.prior is not None else
                                 (None, "the upload check needs the PixelCNN prior, and these models have none"))
    if limits is None:
        result.ssim_brain = slicecheck.ssim_in_box(recon.cpu(), x.cpu(), brain)
        return result
    row = slicecheck.features(vqvae, bundle.scorer, image[None], encoded=(codes, recon), brains=[brain])[0]
    result.ssim_brain, result.check = row["ssim_brain"], slicecheck.judge(row, limits.limits)
    return result


# ----------------------------------------------------------------------------- browsing


@dataclass(eq=False)
class SampleSlice:
    """One slice to browse: its pixels and what is known about it."""

    key: str                 # stable id: path relative to the data folder, or the bundled file name
    image: np.ndarray        # uint8 (256,256), possibly a memory-mapped row
    label: str               # caption
    name: str                # file name without suffix
    case: str | None = None
    slice_index: int | None = None
    class_label: str | None = None


@dataclass
class SampleSet:
    """The slices the Browse tab offers, and where they come from."""

    samples: list[SampleSlice]
    source: str
    layout: str                       # "oasis", "folder" or "bundled"
    notice: str | None = None         # why the configured data folder was not used
    _by_key: dict[str, SampleSlice] = field(default_factory=dict, repr=False)

    _by_name: dict[str, list[SampleSlice]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._by_key = {s.key: s for s in self.samples}
        for s in self.samples:  # caption, file name and file name without suffix, compared loosely
            for alias in {_loose(s.label), _loose(Path(s.key).name), _loose(_stem(s.key))}:
                self._by_name.setdefault(alias, []).append(s)

    def get(self, key: str | None) -> SampleSlice:
        """The slice with this key, caption (as the gallery shows it) or file name; case and punctuation aside."""
        key = (key or "").strip()
        if not key:
            raise DemoError("Pick a slice in the Browse tab first, or type its caption or file name.")
        if key in self._by_key:
            return self._by_key[key]
        found = self._by_name.get(_loose(key), [])
        if len(found) > 1:
            names = ", ".join(s.key for s in found[:5])
            raise DemoError(f"{key!r} names {len(found)} slices ({names}{', ...' if len(found) > 5 else ''}): "
                            "type the whole file name.")
        if not found:
            raise DemoError(f"No slice has the caption or file name {key!r}; pick one in the Browse tab.")
        return found[0]

    def classes(self) -> list[str]:
        return sorted({s.class_label for s in self.samples if s.class_label})

    def __len__(self) -> int:
        return len(self.samples)


def _stem(path: str) -> str:
    name = Path(path).name
    return name[:-len(".nii.png")] if name.endswith(".nii.png") else Path(name).stem


def samples_from_split(split: data.SliceSet) -> list[SampleSlice]:
    out = []
    for index, item in enumerate(split.items):
        if item.case is not None:
            label = f"case {item.case} · slice {item.slice_index}"
        else:
            label = f"{item.label} · {_stem(item.path)}" if item.label else _stem(item.path)
        out.append(SampleSlice(item.path, split.images[index], label, _stem(item.path), item.case,
                               item.slice_index, item.label))
    return out


def bundled_samples(folder: Path = SAMPLES_DIR) -> list[SampleSlice]:
    """The slices shipped in assets/samples, named ``<Class>_<name>.<ext>``."""
    out = []
    for path in sorted(p for p in folder.glob("*") if p.suffix.lower() in data.IMAGE_SUFFIXES):
        class_label, _, name = path.stem.partition("_")
        if not name:
            class_label, name = None, path.stem
        label = f"{class_label} · {name}" if class_label else name
        out.append(SampleSlice(path.name, data.read_slice(path), label, name, class_label=class_label))
    return out


def load_samples(data_dir: str | os.PathLike | None = None, samples_dir: Path = SAMPLES_DIR) -> SampleSet:
    """The test split of the data folder (``data_dir``, else $BRAINVQ_DATA, else ./keras_png_slices_data)
    when it is there, else the bundled samples; a notice says why a folder that was asked for is not used."""
    asked = data_dir or os.environ.get("BRAINVQ_DATA")
    root = data.resolve_data_dir(data_dir)
    notice = None
    if asked or root.exists():
        try:
            split = data.load_split(root, "test")
            return SampleSet(samples_from_split(split), f"test split of {root.name}/ ({len(split)} slices)",
                             split.layout)
        except data.DataError as error:
            reason = str(error).splitlines()[0]
            notice = f"The data folder could not be used, so the bundled samples are shown: {reason}"
    samples = bundled_samples(samples_dir)
    return SampleSet(samples, f"{len(samples)} bundled test slices (assets/samples)", "bundled", notice)


_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def _match_number(value, wanted: str) -> bool:
    if value is None:
        return False
    match = _RANGE.match(wanted)
    try:
        number = int(value)
        if match:
            return int(match.group(1)) <= number <= int(match.group(2))
        return number == int(wanted)
    except ValueError:
        return wanted.lower() in str(value).lower()


def _loose(text: str) -> str:
    """Lower case with every run of other characters as one '-': "26 (19).jpg" and "26-19" meet."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def filter_samples(samples: Sequence[SampleSlice], query: str = "",
                   class_label: str | None = None) -> list[SampleSlice]:
    """Slices matching every term of ``query`` and the class ``class_label`` (None, "" or "All" = any).

    Terms: ``case:12`` (OASIS case, leading zeros ignored), ``slice:20`` or ``slice:20-30`` (slice index or
    range), ``class:MildDemented`` (the whole class name), anything else: contained in the caption or file name.
    Terms are separated by spaces or commas; matching ignores case.
    """
    terms = [t for t in re.split(r"[\s,]+", (query or "").strip()) if t]
    want_class = None if class_label in (None, "", "All") else class_label.lower()
    out = []
    for s in samples:
        if want_class is not None and (s.class_label or "").lower() != want_class:
            continue
        ok = True
        for term in terms:
            key, sep, value = term.partition(":")
            key = key.lower()
            if sep and key == "case":
                ok = _match_number(s.case, value)
            elif sep and key == "slice":
                ok = _match_number(s.slice_index, value)
            elif sep and key == "class":
                ok = value.lower() == (s.class_label or "").lower()
            else:
                text, loose = term.lower(), _loose(term)
                ok = any(text in t.lower() or (loose and loose in _loose(t)) for t in (s.label, s.key))
            if not ok:
                break
        if ok:
            out.append(s)
    return out


def browse(samples: SampleSet, query: str = "", class_label: str | None = None,
           limit: int = GALLERY_LIMIT) -> tuple[list[SampleSlice], str]:
    """The first ``limit`` matching slices, and a status line saying how many matched and where they come from."""
    found = filter_samples(samples.samples, query, class_label)
    shown = found[:limit]
    more = f"; showing the first {len(shown)}" if len(found) > len(shown) else ""
    return shown, f"{len(found)} of {len(samples)} slices match{more} · {samples.source}"


def filter_help(layout: str) -> str:
    if layout == "oasis":
        return "Filter by `case:12`, `slice:20` or `slice:20-30`, or any text in the caption."
    return "Filter by class (menu or `class:MildDemented`) or by any text in the file name, e.g. `26-19`."


# ----------------------------------------------------------------------------- models


class ModelHolder:
    """The models every session uses. A reload replaces them for everyone; a failed load keeps the old ones.

    Loads are serialised by a lock; readers take the current bundle without waiting (the swap is one
    assignment), and a generation that started on the old bundle finishes on it.
    """

    def __init__(self, bundle=None, startup_notice: str | None = None):
        self._bundle = bundle
        self._startup_notice = startup_notice
        self._lock = threading.Lock()

    @property
    def bundle(self):
        return self._bundle

    def require(self):
        return require_bundle(self._bundle)

    @property
    def notice(self) -> str | None:
        """The fallback notice of the current bundle, or why nothing is loaded."""
        if self._bundle is None:
            return self._startup_notice
        return self._bundle.notice

    def replace(self, load: Callable[[], object]):
        """Run ``load`` (one at a time) and install its bundle; any exception leaves the old bundle in place."""
        with self._lock:
            bundle = load()
            self._bundle = bundle
            return bundle


BUNDLE_PARTS = ("vqvae", "pixelcnn")
MODEL_FILES = ("config.json", "model.safetensors")


def _shown(path: Path) -> str:
    """A path relative to the project when inside it (what a visitor of a hosted demo can relate to)."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _dangling(path: Path) -> str | None:
    """Why ``path`` is a link to nothing, or None."""
    if path.is_symlink() and not path.exists():
        return (f"`{_shown(path)}` is a link to `{os.readlink(path)}`, which does not exist (a copy made with "
                "`cp -r` keeps a run's links: copy with `cp -rL`, or load the run's own `best` folder)")
    return None


def check_bundle(folder: str | os.PathLike) -> None:
    """Raise a DemoError naming what keeps ``folder`` from loading as a bundle: a link to nothing (the folder,
    ``vqvae/``, ``pixelcnn/`` or one of their files), a missing ``vqvae/``, or a single checkpoint in its place.
    A missing ``pixelcnn/`` is allowed: the bundle then reconstructs but cannot generate."""
    folder = Path(folder)
    problem = _dangling(folder)
    if problem is None and not folder.is_dir():
        problem = f"`{_shown(folder)}` {'is not a folder' if folder.exists() else 'does not exist'}"
    for part in BUNDLE_PARTS:
        for path in (folder / part, *(folder / part / name for name in MODEL_FILES)):
            problem = problem or _dangling(path)
    if problem is None and not (folder / "vqvae").is_dir():
        single = folder / "config.json"
        kind = _config_kind(single) if single.is_file() else None
        problem = (f"`{_shown(folder)}` holds a single {kind or 'model'} checkpoint, not a bundle"
                   if single.is_file() else f"`{_shown(folder)}` has no `vqvae/` folder")
        problem += (": a bundle folder holds `vqvae/` and `pixelcnn/`, as `checkpoints/` does and as "
                    "train/train_pixelcnn.py writes `OUT/best`")
    if problem:
        raise DemoError(problem[0].upper() + problem[1:] + ".")


def _config_kind(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text()).get("kind"))
    except (OSError, ValueError, AttributeError):
        return None


def load_local(folder: str, allowed_roots: Sequence[Path]):
    """The bundle in a local ``folder`` under one of ``allowed_roots`` (``hub.load_local``), after
    ``check_bundle`` has named anything that keeps it from loading."""
    from brainvq import hub

    hub.resolve_local(folder, list(allowed_roots))  # refuses folders outside the roots before anything is read
    raw = Path(str(folder).strip())
    check_bundle(raw if raw.is_absolute() else REPO_ROOT / raw)
    return hub.load_local(folder, list(allowed_roots))


_HIDDEN = {"notice", "grid_size", "has_prior", "folder"}  # notice: own banner; the rest: redundant with source
_LABELS = {"K": "codes (K)", "D": "code dimension (D)", "grid": "code grid", "vqvae_params": "VQ-VAE parameters",
           "prior_params": "PixelCNN parameters", "vqvae_fingerprint": "VQ-VAE fingerprint", "data": "training data",
           "scoring_prior": "prior of the anomaly maps and upload check"}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) or "—"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _rows(prefix: str, value) -> list[tuple[str, str]]:
    if value is None or value == {}:
        return []
    if isinstance(value, dict):
        return [row for key, sub in value.items() for row in _rows(f"{prefix} · {key}" if prefix else key, sub)]
    return [(prefix, _fmt(value))]


def describe_markdown(bundle) -> str:
    """A Markdown table of ``bundle.describe()``: source, K, D, grid, parameter counts, metrics, training data."""
    if bundle is None:
        return "**No models loaded.** Load a checkpoint folder or a Hub repository below."
    info = bundle.describe()
    rows = []
    for key, value in info.items():
        if key not in _HIDDEN:
            rows += _rows(_LABELS.get(key, key), value)
    lines = ["| property | value |", "|---|---|"] + [f"| {k.replace('_', ' ')} | {v} |" for k, v in rows]
    if bundle.prior is None:
        lines.append("\n*This bundle has no PixelCNN prior (no `pixelcnn/` folder): Generate is unavailable.*")
    return "\n".join(lines)

"""Brain-slice data pipeline: finds the slices, splits them, caches them as uint8 arrays, serves tensors.

Two layouts load:
  * OASIS ``keras_png_slices_data``: ``keras_png_slices_{train,validate,test}/case_NNN_slice_S.nii.png``.
    Train and validate are merged and 10% of the *cases* are held out for validation; test stays apart.
  * A plain image folder with ``train/`` and ``test/`` (PNG/JPEG, class sub-folders or not), such as the
    Kaggle Alzheimer set. Validation is 10% of train, split by *file* because there are no case ids.

Every item becomes a 1x256x256 float32 tensor in [0, 1]. Decoded images are cached once per partition as a
uint8 ``.npy`` plus a JSON manifest and memory-mapped afterwards; both are written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from brainvq.io import atomic_write_bytes, atomic_write_json

IMAGE_SIZE = 256
VAL_FRACTION = 0.1
DEFAULT_DATA_DIR = "keras_png_slices_data"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OASIS_DIRS = {"train": "keras_png_slices_train", "validate": "keras_png_slices_validate",
              "test": "keras_png_slices_test"}
OASIS_NAME = re.compile(r"case_(\d+)_slice_(\d+)\.nii\.png$")
CACHE_VERSION = 1

HOW_TO_GET_DATA = (
    "BrainVQ reads one of two layouts:\n"
    "  1. OASIS keras_png_slices_data/ with keras_png_slices_train/, keras_png_slices_validate/ and\n"
    "     keras_png_slices_test/ holding case_NNN_slice_S.nii.png files. Download the preprocessed OASIS\n"
    "     brain slices (keras_png_slices_data.zip, e.g. from the UQ COMP3710 course page or the OASIS-1\n"
    "     project at https://sites.wustl.edu/oasisbrains/) and unzip it in the project folder.\n"
    "  2. Any image folder with train/ and test/ sub-folders of PNG or JPEG slices (class sub-folders allowed).\n"
    "Point BrainVQ at it with --data-dir DIR or the BRAINVQ_DATA environment variable."
)


class DataError(RuntimeError):
    """A data folder, image or cache that BrainVQ cannot use, with a message saying how to fix it."""


@dataclass(frozen=True)
class SliceItem:
    """One slice on disk, with the case id and slice index when the file name carries them."""

    path: str
    case: str | None = None
    slice_index: int | None = None
    label: str | None = None


@dataclass
class SliceSet:
    """The images of one split (uint8, N x 256 x 256, usually memory-mapped) and their items."""

    images: np.ndarray
    items: list[SliceItem]
    layout: str
    root: str

    def __len__(self) -> int:
        return len(self.items)


# ----------------------------------------------------------------------------- locating and listing


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $BRAINVQ_DATA, else ./keras_png_slices_data (the seed's convention)."""
    return Path(data_dir or os.environ.get("BRAINVQ_DATA") or DEFAULT_DATA_DIR).expanduser()


def detect_layout(root: Path) -> str:
    """Return "oasis" or "folder" for a data root, or raise DataError naming the expected layouts."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data folder {str(root)!r} does not exist.\n{HOW_TO_GET_DATA}")
    if (root / OASIS_DIRS["train"]).is_dir() or (root / OASIS_DIRS["test"]).is_dir():
        return "oasis"
    nested = root / DEFAULT_DATA_DIR
    if (nested / OASIS_DIRS["train"]).is_dir():
        raise DataError(f"{str(root)!r} holds {DEFAULT_DATA_DIR}/ one level down: pass --data-dir {nested}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder"
    raise DataError(f"{str(root)!r} is not a slice folder BrainVQ knows.\n{HOW_TO_GET_DATA}")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _oasis_items(root: Path, part: str) -> list[SliceItem]:
    items = []
    for sub in (["train", "validate"] if part == "pool" else ["test"]):
        folder = root / OASIS_DIRS[sub]
        if not folder.is_dir():
            raise DataError(f"OASIS folder {str(folder)!r} is missing.\n{HOW_TO_GET_DATA}")
        for path in _images_under(folder):
            match = OASIS_NAME.search(path.name)
            if match is None:
                raise DataError(f"{str(path)!r} is not named case_NNN_slice_S.nii.png, so its case is unknown. "
                                "Rename it, or move it out of the OASIS folders.")
            items.append(SliceItem(str(path.relative_to(root)), match.group(1), int(match.group(2))))
    return items


def _folder_items(root: Path, part: str) -> list[SliceItem]:
    folder = root / ("train" if part == "pool" else "test")
    items = []
    for path in _images_under(folder):
        label = path.parent.name if path.parent != folder else None
        items.append(SliceItem(str(path.relative_to(root)), label=label))
    return items


KAGGLE_NAME = re.compile(r"^(\d+)(?: \((\d+)\))?$")


def kaggle_position(item: SliceItem) -> tuple[str, int] | None:
    """(volume, slice number) of a test file of the Kaggle 4-class set, read from its name: "N (k).jpg" is slice N
    of volume k of its class folder, "N.jpg" a slice of the folder's first volume (an undocumented convention,
    measured by bench/volumes.py). None for other names, such as the train folder's "nonDem123.jpg"."""
    match = KAGGLE_NAME.match(Path(item.path).stem)
    if match is None or item.label is None:
        return None
    return f"{Path(item.path).parts[0]}/{item.label}/{match.group(2) or 0}", int(match.group(1))


def kaggle_volume(item: SliceItem) -> str | None:
    """The volume of ``item`` by kaggle_position, or None."""
    position = kaggle_position(item)
    return position[0] if position else None


def volume_halves(items: Sequence[SliceItem], seed: int) -> tuple[list[int], list[int]]:
    """Indices of two halves of a partition with no volume in both (kaggle_volume, else the OASIS case, else each
    file on its own), drawn by ``seed``: one half to choose on, the other to report on."""
    groups = [kaggle_volume(item) or item.case or item.path for item in items]
    names = sorted(set(groups))
    first = {names[i] for i in np.random.default_rng(seed).permutation(len(names))[:len(names) // 2]}
    return [i for i, g in enumerate(groups) if g in first], [i for i, g in enumerate(groups) if g not in first]


def list_partition(root: Path, layout: str, part: str) -> list[SliceItem]:
    """Items of a partition: "pool" (everything train/val is drawn from) or "test"."""
    items = (_oasis_items if layout == "oasis" else _folder_items)(root, part)
    if not items:
        where = "train/validate" if part == "pool" else "test"
        raise DataError(f"No PNG or JPEG slices found in the {where} part of {str(root)!r}.\n{HOW_TO_GET_DATA}")
    return items


def split_pool(items: Sequence[SliceItem], seed: int, val_fraction: float = VAL_FRACTION) -> tuple[list[int], list[int]]:
    """Deterministic train/val indices for a seed. Items with case ids are split by case, else by file."""
    rng = np.random.default_rng(seed)
    if all(item.case is not None for item in items):
        cases = sorted({item.case for item in items})
        n_val = max(1, round(len(cases) * val_fraction))
        val_cases = {cases[i] for i in rng.permutation(len(cases))[:n_val]}
        val = [i for i, item in enumerate(items) if item.case in val_cases]
    else:
        n_val = max(1, round(len(items) * val_fraction))
        val = sorted(rng.permutation(len(items))[:n_val].tolist())
    val_set = set(val)
    return [i for i in range(len(items)) if i not in val_set], val


# ----------------------------------------------------------------------------- decoding


def to_slice(image: Image.Image, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """Any PIL image -> uint8 size x size grayscale slice, plus notes on what was changed to get there."""
    notes = []
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8))
        notes.append(f"rescaled {mode} intensities to 8 bits")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
        notes.append("flattened transparency onto black")
    if image.mode != "L":
        notes.append(f"converted {image.mode} to grayscale")
        image = image.convert("L")
    width, height = image.size
    if width > size or height > size:
        scale = size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(new, Image.Resampling.LANCZOS)
        notes.append(f"resized {width}x{height} to {new[0]}x{new[1]} keeping the aspect ratio")
        width, height = new
    if (width, height) != (size, size):
        notes.append(f"centre-padded {width}x{height} with black to {size}x{size}")
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - height) // 2, (size - width) // 2
    out[top:top + height, left:left + width] = np.asarray(image, dtype=np.uint8)
    return out, notes


def content_box(shape: tuple[int, int], size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an image of ``shape`` (h, w) once ``to_slice`` has placed it."""
    height, width = shape
    if height > size or width > size:
        scale = size / max(height, width)
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
    return (size - height) // 2, (size - width) // 2, height, width


def zoom_frames(images: np.ndarray, factor: float) -> np.ndarray:
    """Zoom uint8 (N,S,S) frames about their centre by ``factor`` (bilinear), cropping or black-padding back to S:
    brains of another size, for training a prior that does not expect every brain to be the training slices' size."""
    if factor == 1:
        return np.asarray(images)
    size = images.shape[-1]
    new = max(1, round(size * factor))
    out = np.zeros_like(images)
    for i, frame in enumerate(images):
        big = np.asarray(Image.fromarray(np.asarray(frame)).resize((new, new), Image.Resampling.BILINEAR))
        start = (new - size) // 2
        out[i] = big[start:start + size, start:start + size] if new >= size else to_slice(Image.fromarray(big), size)[0]
    return out


def read_slice(path: Path) -> np.ndarray:
    """Decode one slice file to uint8 256x256, or raise DataError naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_slice(image)[0]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"Cannot decode image {str(path)!r}: {error}. Replace or delete the file, "
                        "or pass --skip-bad to skip undecodable files.") from error


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("BRAINVQ_CACHE") or Path.home() / ".cache" / "brainvq").expanduser()


def _fingerprint(root: Path, items: Sequence[SliceItem]) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{IMAGE_SIZE}".encode())
    for item in items:
        stat = (root / item.path).stat()
        digest.update(f"{item.path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_paths(root: Path, layout: str, part: str, cache_dir: Path) -> tuple[Path, Path]:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    stem = cache_dir / f"{layout}-{part}-{key}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _load_cache(npy: Path, manifest_path: Path, fingerprint: str) -> tuple[np.ndarray, list[SliceItem]] | None:
    """The cached array and items if the manifest matches the files and the array is intact, else None."""
    if not manifest_path.exists() and not npy.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        stat = npy.stat()
        if manifest["fingerprint"] != fingerprint:
            reason = "the image files changed since it was built"
        elif (stat.st_size, stat.st_mtime_ns) != (manifest["npy_size"], manifest["npy_mtime_ns"]):
            reason = "the array file was modified or truncated"
        else:
            images = np.load(npy, mmap_mode="r", allow_pickle=False)
            if images.shape != (len(manifest["items"]), IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8:
                reason = f"the array has shape {images.shape} {images.dtype}"
            else:
                return images, [SliceItem(**item) for item in manifest["items"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = f"it is unreadable ({type(error).__name__}: {error})"
    print(f"[brainvq.data] rebuilding cache {npy.name}: {reason}")
    return None


def _decode_all(root: Path, items: list[SliceItem], skip_bad: bool) -> tuple[np.ndarray, list[SliceItem]]:
    images = np.zeros((len(items), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)

    def decode(index: int) -> str | None:
        try:
            images[index] = read_slice(root / items[index].path)
        except DataError as error:
            if not skip_bad:
                raise
            return str(error).split(":")[0]
        return None

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        failures = list(pool.map(decode, range(len(items))))
    bad = [i for i, failure in enumerate(failures) if failure is not None]
    if bad:
        warnings.warn(f"Skipped {len(bad)} undecodable image(s), e.g. {items[bad[0]].path}", stacklevel=3)
        keep = [i for i in range(len(items)) if failures[i] is None]
        images, items = images[keep], [items[i] for i in keep]
    if not items:
        raise DataError(f"Every image in {str(root)!r} failed to decode.")
    return images, items


def load_partition(root: Path, layout: str, part: str, cache_dir: Path | None = None,
                   skip_bad: bool = False) -> tuple[np.ndarray, list[SliceItem]]:
    """All images of a partition, from the cache when it is valid, else decoded and cached atomically."""
    listed = list_partition(root, layout, part)
    fingerprint = _fingerprint(root, listed) + ("|skip" if skip_bad else "")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    npy, manifest_path = _cache_paths(root, layout, part, cache_dir)
    cached = _load_cache(npy, manifest_path, fingerprint)
    if cached is not None:
        return cached
    images, items = _decode_all(root, listed, skip_bad)
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # the old manifest must never vouch for a new array
    atomic_write_bytes(npy, lambda f: np.save(f, images, allow_pickle=False))
    stat = npy.stat()
    atomic_write_json(manifest_path, {"version": CACHE_VERSION, "root": str(root.resolve()), "layout": layout,
                                      "part": part, "fingerprint": fingerprint, "npy_size": stat.st_size,
                                      "npy_mtime_ns": stat.st_mtime_ns, "built": time.time(),
                                      "items": [asdict(item) for item in items]})
    return np.load(npy, mmap_mode="r", allow_pickle=False), items


def load_split(data_dir: str | os.PathLike | None, split: str, seed: int = 0, cache_dir: Path | None = None,
               skip_bad: bool = False) -> SliceSet:
    """Load "train", "val" or "test" of a data root as a SliceSet (the split is fixed by ``seed``)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, not {split!r}")
    root = resolve_data_dir(data_dir)
    layout = detect_layout(root)
    images, items = load_partition(root, layout, "test" if split == "test" else "pool", cache_dir, skip_bad)
    if split != "test":
        train_idx, val_idx = split_pool(items, seed)
        index = train_idx if split == "train" else val_idx
        images, items = images[index], [items[i] for i in index]
    return SliceSet(images=images, items=items, layout=layout, root=str(root))


# ----------------------------------------------------------------------------- torch side


class SliceDataset(Dataset):
    """Float32 1x256x256 tensors in [0, 1] from a uint8 array; optional random square crops for training."""

    def __init__(self, images: np.ndarray, crop: int | None = None, seed: int = 0):
        self.images = images
        self.crop = crop
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Crops depend on (seed, epoch, index), so a resumed run sees the same crops."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if self.crop is not None and self.crop < image.shape[-1]:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            top, left = rng.integers(0, image.shape[-1] - self.crop + 1, size=2)
            image = image[top:top + self.crop, left:left + self.crop]
        return torch.from_numpy(np.array(image, dtype=np.float32) / 255.0).unsqueeze(0)


class GlobalBatchSampler(Sampler[int]):
    """The indices one process reads, chosen so that the global batch is the same at any world size.

    Epoch ``e`` reads a permutation fixed by ``(seed, e)`` (``set_epoch``; no shuffle: 0..N-1). Step ``s`` is
    the global batch ``order[s*G:(s+1)*G]`` with ``G = batch_size * world_size``, and rank ``r`` reads its
    ``r``-th contiguous chunk of ``batch_size``. So one process with batch ``G`` and ``W`` processes with batch
    ``G/W`` see the same images at every step, and the ranks' batches concatenated in rank order are the
    single-process batch row for row (what ``VectorQuantizer._random_rows`` relies on).

    ``drop_last``: only whole global batches (``N // G`` steps). Otherwise the last, partial global batch is
    padded by wrapping round to a multiple of ``world_size`` and split evenly (as DistributedSampler pads), so
    every rank takes the same number of steps; with one process nothing is padded.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler setup: batch_size {batch_size}, rank {rank}, world_size {world_size}")
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle: epoch ``e`` reads the order fixed by ``epoch_seed(seed, e)``, at any world size."""
        self.epoch = epoch

    def order(self) -> list[int]:
        """This epoch's global order of all indices (the same on every rank)."""
        if not self.shuffle:
            return list(range(self.size))
        from brainvq.training import epoch_seed

        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        # One draw first, as the DataLoader drew its base seed from RandomSampler's generator before the
        # permutation: a single process reads exactly the order the training scripts read before this sampler
        # (RandomSampler seeded with epoch_seed(seed, epoch)), so runs begun then resume on the same order.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        return torch.randperm(self.size, generator=generator).tolist()

    def _tail(self) -> int:
        """How many indices this rank reads from the last, partial global batch (0 with drop_last)."""
        rest = self.size % (self.batch_size * self.world_size)
        return 0 if self.drop_last or rest == 0 else -(-rest // self.world_size)

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world_size) * self.batch_size + self._tail()

    def __iter__(self) -> Iterator[int]:
        order, b, w = self.order(), self.batch_size, self.world_size
        steps = self.size // (b * w)
        for step in range(steps):
            start = (step * w + self.rank) * b
            yield from order[start:start + b]
        tail = self._tail()
        start = steps * b * w + self.rank * tail
        for i in range(start, start + tail):
            yield order[i % self.size]  # padding wraps round to the start of the order


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, distributed: bool = False,
                drop_last: bool = False, rank: int | None = None, world_size: int | None = None) -> DataLoader:
    """A DataLoader over a GlobalBatchSampler: ``batch_size`` per process, order fixed by ``(seed, epoch)``.

    One process and ``distributed`` (rank and world size from torch.distributed, or given) use the same
    sampler, so the global batch ``batch_size * world_size`` holds the same images at every step whatever the
    world size. Call ``loader.sampler.set_epoch(epoch)`` each epoch to reshuffle.
    """
    if distributed and (rank is None or world_size is None):
        import torch.distributed as dist

        rank, world_size = dist.get_rank(), dist.get_world_size()
    sampler = GlobalBatchSampler(len(dataset), batch_size, shuffle, seed, rank or 0, world_size or 1, drop_last)
    # The generator only seeds the loader's base seed: without it each epoch would consume the global RNG.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(seed),
                      drop_last=drop_last, num_workers=0)


def iter_batches(images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """Full-size float batches in order, for evaluation and encoding."""
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start:start + batch_size], dtype=np.float32) / 255.0
        yield torch.from_numpy(chunk).unsqueeze(1)

"""What both training scripts share: device and torchrun setup, reproducible seeding, atomic run snapshots
(``best`` and ``last`` are symlinks swapped atomically onto complete folders), and the curve plots."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from brainvq.checkpoint import CheckpointError


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size (1 without torchrun)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto") -> torch.device:
    """"auto" means cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_runtime(device: str = "auto") -> Runtime:
    """Initialise torch.distributed when launched by torchrun (nccl on CUDA, gloo otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Runtime(chosen, rank, world_size, local_rank)


def teardown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA where supported, fp16 on older GPUs; nothing changes on CPU/MPS."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """All-reduce (sum) a dict of floats across ranks; identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, tensor.tolist()))


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffling for one epoch depends only on (seed, epoch), so a resumed run replays the same order."""
    return seed * 100_003 + epoch


# ----------------------------------------------------------------------------- run folders


def write_snapshot(run_dir: Path, name: str, tag: str, write: Callable[[Path], None]) -> Path:
    """Write a complete folder ``name-tag`` then atomically point the symlink ``name`` at it.

    A kill at any moment leaves ``name`` pointing at a complete folder (old or new), never a half-written one.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / f"{name}-{tag}"
    if target.exists():  # never touch the folder the link may point at: write beside it instead
        target = run_dir / f"{name}-{tag}-{time.time_ns()}"
    write(target)
    link = run_dir / f".{name}.link"
    link.unlink(missing_ok=True)
    link.symlink_to(target.name)
    os.replace(link, run_dir / name)
    for old in run_dir.glob(f"{name}-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return run_dir / name


def resume_folder(run_dir: Path) -> Path:
    """The ``last`` snapshot of a run, or a CheckpointError saying there is nothing to resume."""
    last = run_dir / "last"
    if not last.exists():
        raise CheckpointError(f"Cannot --resume: {str(last)!r} does not exist. Start without --resume, "
                              "or pass the --out folder of the run you want to continue.")
    return last.resolve()


def plot_curves(history: list[dict], keys: list[tuple[str, str]], path: Path, title: str) -> None:
    """One PNG panel per (train_key, val_key) pair, epochs on x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainvq.io import atomic_write_bytes

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, (train_key, val_key) in zip(axes[0], keys):
        ax.plot(epochs, [h[train_key] for h in history], "o-", label="train")
        ax.plot(epochs, [h[val_key] for h in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(train_key.removeprefix("train_"))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def write_history(run_dir: Path, history: list[dict]) -> None:
    from brainvq.io import atomic_write_json

    atomic_write_json(run_dir / "history.json", history)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())

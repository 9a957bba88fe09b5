"""What both training scripts share: device and torchrun setup, reproducible seeding, atomic run snapshots
(``best`` and ``last`` are symlinks swapped atomically onto complete folders), and the curve plots."""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from brainvq.checkpoint import CheckpointError, load_training_state, load_weights

T = TypeVar("T")


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
    """Where this process runs. Under torchrun (WORLD_SIZE > 1) also join the process group: nccl on CUDA,
    gloo otherwise, each rank on GPU LOCAL_RANK. On CUDA allow TF32 matmuls; on CPU nothing changes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = pick_device(device)
    if chosen.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size == 1:
        return Runtime(chosen)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        if chosen.type == "cuda":
            dist.init_process_group("nccl", device_id=chosen)
        else:
            dist.init_process_group("gloo")
    return Runtime(chosen, rank, world_size, local_rank)


def barrier() -> None:
    """Wait for every rank (no-op in a single process). NCCL knows its GPU from ``init_process_group``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank0_first(runtime: Runtime, load: Callable[[], T]) -> T:
    """``load()`` on rank 0, then on every other node's local rank 0, then on the remaining ranks, with a
    barrier after each turn: a cache that ``load`` builds on disk (decoded images) is built once, by one
    process per machine at most, and the others read it. In a single process: just ``load()``."""
    turn = 0 if runtime.rank == 0 else 1 if runtime.local_rank == 0 else 2
    result = None
    for phase in range(3 if runtime.distributed else 1):
        if phase == turn:
            result = load()
        barrier()
    return result


def teardown(runtime: Runtime) -> None:
    """Leave the process group once every rank is done (rank 0 may still be writing files)."""
    if runtime.distributed and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Same seed on every rank: same init, and the same CPU RNG stream (codebook draws rely on it)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA where supported, fp16 on older GPUs, None (full fp32) elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (see ``amp_dtype``); nothing changes on CPU/MPS."""
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (older GPUs); disabled (a pass-through) for bf16, fp32 and CPU."""
    enabled = amp_dtype(device) == torch.float16
    return torch.amp.GradScaler("cuda" if enabled else "cpu", enabled=enabled)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA (faster convolutions under AMP), the layout as it is elsewhere.

    Use as ``model.to(device, memory_format=memory_format(device))`` and likewise for image batches.
    """
    return torch.channels_last if device.type == "cuda" else torch.preserve_format


def wrap_model(model: torch.nn.Module, runtime: Runtime, compile: bool = False, sync_buffers: bool = True,
               static_graph: bool = False) -> torch.nn.Module:
    """The module to call in the training step: DistributedDataParallel under torchrun, then torch.compile
    when asked. Keep ``model`` itself for evaluation and saving (its state dict has no ``module.`` prefix).

    ``sync_buffers=False``: DDP does not re-broadcast rank 0's buffers before each forward (the VQ-VAE keeps
    its codebook buffers equal itself). ``static_graph``: the same parameters are used every step, some never
    (the PixelCNN's last vertical-stack output), so DDP learns which once instead of failing or searching the
    graph every step.
    """
    net = model
    if runtime.distributed:
        options: dict = {"static_graph": static_graph}
        if not sync_buffers:  # forward_sync_buffers replaces broadcast_buffers in newer torch
            parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
            options["forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"] = False
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None, **options)
    if compile:
        net = torch.compile(net)
    return net


def reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """All-reduce (sum) a dict of floats across ranks; identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, tensor.tolist()))


@torch.no_grad()
def sharded_means(model: torch.nn.Module, batches, runtime: Runtime, names: tuple[str, ...],
                  measure: Callable[[torch.Tensor], dict[str, float]]) -> dict[str, float]:
    """Per-item means of the batch sums ``measure`` returns, over this rank's ``batches`` (its shard of a
    validation set) and all-reduced across ranks, so every rank gets the full set's means. Eval mode meanwhile."""
    model.eval()
    sums = dict.fromkeys((*names, "n"), 0.0)  # fixed keys and order: the all-reduce needs them on every rank
    for batch in batches:
        batch = batch.to(runtime.device)
        for name, value in measure(batch).items():
            sums[name] += float(value)
        sums["n"] += len(batch)
    sums = reduce_sums(sums, runtime.device)
    model.train()
    return {name: sums[name] / sums["n"] for name in names}


def reduce_tensor(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``tensor`` summed across ranks (e.g. code histograms), on the tensor's own device."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    summed = tensor.to(device, copy=True)
    dist.all_reduce(summed)
    return summed.to(tensor.device)


def check_in_sync(tensors: dict[str, torch.Tensor]) -> None:
    """Raise if any rank holds different values than rank 0 (no-op in a single process).

    For state that DDP does not synchronise itself, such as the VQ-VAE codebook: one broadcast per check.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for name, tensor in tensors.items():
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        differs = torch.tensor([0.0 if torch.equal(reference, tensor) else 1.0], device=tensor.device)
        dist.all_reduce(differs)
        if differs.item():
            raise RuntimeError(f"{name} differs between ranks ({int(differs.item())} rank(s) disagree with rank 0): "
                               "the ranks no longer train the same model")


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffling for one epoch depends only on (seed, epoch), so a resumed run replays the same order
    (``data.GlobalBatchSampler`` seeds each epoch's permutation with it, at any world size)."""
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


def resume_run(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               runtime: Runtime) -> dict:
    """Load ``run_dir/last`` into the model and optimizer (and the RNG); return the saved state
    (``epoch``, ``history`` and the script's best metric)."""
    last = resume_folder(run_dir)
    load_weights(model, last)
    state, _ = load_training_state(last, optimizer)
    if runtime.is_main:
        print(f"resumed from {last} at epoch {state['epoch'] + 2}")
    return state


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

"""What the training scripts share: their common flags, device and torchrun setup, reproducible seeding, the
data splits, the epoch loop (``fit``: learning-rate schedule, progress bars, validation, atomic ``best`` and
``last`` snapshots, history and curves)."""
from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from brainvq import data
from brainvq.checkpoint import CheckpointError, load_training_state, load_weights, save_training_state

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
def sharded_means(model: torch.nn.Module, batches: Iterable[torch.Tensor], steps: int, runtime: Runtime,
                  names: tuple[str, ...], measure: Callable[[torch.Tensor], dict[str, float]]) -> dict[str, float]:
    """Per-item means of the batch sums ``measure`` returns, over this rank's ``batches`` (its shard of a
    validation set, ``steps`` batches: the progress bar's total) and all-reduced across ranks, so every rank gets
    the full set's means. Eval mode meanwhile."""
    model.eval()
    sums = dict.fromkeys((*names, "n"), 0.0)  # fixed keys and order: the all-reduce needs them on every rank
    for batch in tqdm(batches, total=steps, desc="validation", disable=not runtime.is_main, leave=False,
                      dynamic_ncols=True):
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
    (``epoch`` and ``history``)."""
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


# ----------------------------------------------------------------------------- the scripts' shared parts


def common_args(p: argparse.ArgumentParser, out: str, epochs: int, batch_size: int, lr: float) -> None:
    """The flags the training scripts take, with that script's defaults for the run folder and the schedule."""
    p.add_argument("--data-dir", help="OASIS keras_png_slices_data or an image folder (default $BRAINVQ_DATA)")
    p.add_argument("--out", default=out, help="run folder (default %(default)s)")
    p.add_argument("--epochs", type=int, default=epochs, help="default %(default)s, the shipped run")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help="per process; the global batch is this times the number of processes")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate; cosine decay to lr/50 over --epochs")
    p.add_argument("--seed", type=int, default=0, help="fixes the initialisation, the shuffling and any crops")
    p.add_argument("--split-seed", type=int, default=0, help="fixes the train/validation split (the shipped: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step's model (for CUDA)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable images with a warning")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (smoke runs)")
    p.add_argument("--limit", type=int, default=0,
                   help="use at most this many training and validation slices each (smoke runs; 0 = all)")


def take(slices: data.SliceSet, limit: int) -> data.SliceSet:
    """At most ``limit`` slices (0 = all), evenly spaced over the split so that every class folder is in."""
    if not limit or limit >= len(slices):
        return slices
    index = np.linspace(0, len(slices) - 1, limit).round().astype(np.int64)
    return data.SliceSet(slices.images[index], [slices.items[i] for i in index], slices.layout, slices.root)


def load_splits(args: argparse.Namespace, runtime: Runtime,
                splits: tuple[str, ...] = ("train", "val")) -> list[data.SliceSet]:
    """The splits for ``--split-seed``, cut to ``--limit``; rank 0 decodes and caches the images first."""
    return rank0_first(runtime, lambda: [take(data.load_split(args.data_dir, split, args.split_seed,
                                                              skip_bad=args.skip_bad), args.limit)
                                         for split in splits])


def data_meta(args: argparse.Namespace, train: data.SliceSet, val: data.SliceSet) -> dict:
    """What a checkpoint's config records about its training data (the model card describes it from this)."""
    return {"root": Path(train.root).name, "layout": train.layout, "split_seed": args.split_seed,
            "limit": args.limit or None, "n_train": len(train), "n_val": len(val)}


def lr_at(epoch: int, epochs: int, lr: float) -> float:
    """Cosine decay from lr to lr/50 over the run; a function of the epoch alone, so resume needs no state."""
    progress = epoch / max(epochs - 1, 1)
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader,
        args: argparse.Namespace, runtime: Runtime, *,
        step: Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
        validate: Callable[[], dict[str, float]],
        save_best: Callable[[Path, dict], None], save_last: Callable[[Path], None],
        best: str, higher_is_better: bool, curves: list[tuple[str, str]], title: str,
        wrap: dict | None = None, clip: float | None = None, rate: str = "images_per_s",
        before_epoch: Callable[[int], None] | None = None, after_epoch: Callable[[], dict] | None = None,
        postfix: Callable[[], dict] | None = None) -> list[dict]:
    """The epoch loop of the training scripts; returns the history (one record per epoch).

    Each epoch sets the learning rate ``lr_at(epoch)``, trains ``min(len(loader), --max-steps)`` steps under a
    tqdm bar with that total (``step(net, batch)`` returns the loss and per-batch means to show and average
    into ``train_*``), then records ``validate()`` and ``after_epoch()``. Rank 0 prints the record, keeps the
    model with the best ``best`` entry in OUT/best (``save_best(folder, record)``), the last epoch with its
    optimizer state in OUT/last, history.json and curves.png. ``--resume`` restarts after OUT/last's epoch; the
    best so far is read back from its history. A param group's ``lr_scale`` (default 1) multiplies its rate.
    ``wrap``: options for ``wrap_model`` (DDP, torch.compile); ``clip``: gradient-norm clipping; ``rate``: the name
    of the throughput entry.
    """
    out = Path(args.out)
    history: list[dict] = []
    start = 0
    if args.resume:
        state = resume_run(out, model, optimizer, runtime)
        history, start = state["history"], state["epoch"] + 1
    net = wrap_model(model, runtime, compile=args.compile, **(wrap or {}))
    scaler = grad_scaler(runtime.device)  # loss scaling only for fp16 autocast on GPUs without bf16
    pick = max if higher_is_better else min
    best_value = pick((h[best] for h in history), default=None)
    steps = min(len(loader), args.max_steps or len(loader))
    if steps == 0:
        raise SystemExit(f"The training split has fewer slices than one global batch of {args.batch_size} x "
                         f"{runtime.world_size}: lower --batch-size, or raise --limit.")
    for epoch in range(start, args.epochs):
        lr = lr_at(epoch, args.epochs, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loader.sampler.set_epoch(epoch)  # reshuffle: the order depends on (seed, epoch) only
        if before_epoch is not None:
            before_epoch(epoch)
        sums: dict[str, float] = {}
        started = time.time()
        bar = tqdm(itertools.islice(loader, steps), total=steps, desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=not runtime.is_main, leave=False, dynamic_ncols=True)
        for index, batch in enumerate(bar):
            loss, values = step(net, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # DDP averages the ranks' gradients: the global-batch mean
            if clip is not None:
                scaler.unscale_(optimizer)  # clip the true (all-reduced, unscaled) gradient, equal on every rank
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
            for name, value in {**values, "n": 1.0}.items():
                sums[name] = sums.get(name, 0.0) + value * len(batch)
            if index % 10 == 0:
                shown = {name: f"{value:.4f}" for name, value in values.items()}
                bar.set_postfix(shown | (postfix() if postfix else {}))
        sums = reduce_sums(sums, runtime.device)
        record = {"epoch": epoch + 1, **{f"train_{name}": sums[name] / sums["n"] for name in values},
                  **validate(), **(after_epoch() if after_epoch is not None else {}),
                  "lr": lr, "steps": steps, rate: sums["n"] / (time.time() - started)}
        history.append(record)
        if not runtime.is_main:
            continue
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)
        tag = f"{epoch + 1:04d}"
        if best_value is None or (record[best] > best_value if higher_is_better else record[best] < best_value):
            best_value = record[best]
            write_snapshot(out, "best", tag, lambda folder: save_best(folder, record))

        def write_last(folder: Path) -> None:
            save_last(folder)
            save_training_state(folder, optimizer, {"epoch": epoch, "history": history})

        write_snapshot(out, "last", tag, write_last)
        write_history(out, history)
        plot_curves(history, curves, out / "curves.png", title)
    return history

"""Train the gated PixelCNN prior on the code grids of a trained VQ-VAE.

    python train/train_pixelcnn.py --vqvae checkpoints/vqvae --data-dir ../shared/data/alzheimer4class --out runs/pixelcnn
    python train/train_pixelcnn.py --vqvae checkpoints/vqvae --out runs/pixelcnn --resume
    torchrun --standalone --nproc_per_node 4 train/train_pixelcnn.py --vqvae checkpoints/vqvae --out runs/pixelcnn

--batch-size is per process: the global batch is batch size x processes (docs/multi-gpu.md). Only rank 0
encodes and writes the code cache and the run folder; the other ranks wait for it and read.

The training, validation and test images are encoded once and cached in OUT/codes-<vqvae>-<split>.npy.
Keeps the best prior by validation NLL in OUT/best, the last epoch in OUT/last, and curves in OUT/curves.png.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq import checkpoint, data  # noqa: E402
from brainvq.io import atomic_write_bytes  # noqa: E402
from brainvq.metrics import code_histogram, entropy_bits, nats_to_bits  # noqa: E402
from brainvq.pixelcnn import GatedPixelCNN, PixelCNNConfig  # noqa: E402
from brainvq.training import (autocast, barrier, grad_scaler, memory_format, plot_curves,  # noqa: E402
                              reduce_sums, resume_run, seed_everything, setup_runtime, sharded_means, teardown,
                              wrap_model, write_history, write_snapshot)
from brainvq.vqvae import VQVAE, encode_array  # noqa: E402

# ----------------------------------------------------------------------------- defaults (the shipped run)
CHANNELS = 48
LAYERS = 8
EMBED_DIM = 48
POS_DIM = 16
MAX_DILATION = 8
EPOCHS = 6
BATCH_SIZE = 16
LR = 2e-3
SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqvae", default="checkpoints/vqvae", help="VQ-VAE checkpoint folder whose codes are modelled")
    p.add_argument("--data-dir", help="OASIS keras_png_slices_data or an image folder (default $BRAINVQ_DATA)")
    p.add_argument("--out", default="runs/pixelcnn", help="run folder")
    p.add_argument("--codes-dir", help="where encoded codes are cached (default: the run folder)")
    p.add_argument("--channels", type=int, default=CHANNELS)
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--embed-dim", type=int, default=EMBED_DIM)
    p.add_argument("--pos-dim", type=int, default=POS_DIM, help="positional map channels; 0 disables it")
    p.add_argument("--max-dilation", type=int, default=MAX_DILATION, help="1 disables dilation")
    p.add_argument("--first-kernel", type=int, default=7)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="per process; the global batch is this times the number of processes")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--seed", type=int, default=SEED, help="fixes the split, the init and the shuffling")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step's model (for CUDA)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (smoke tests)")
    return p.parse_args(argv)


def lr_at(epoch: int, args: argparse.Namespace) -> float:
    progress = epoch / max(args.epochs - 1, 1)
    return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def cached_codes(vqvae: VQVAE, args: argparse.Namespace, split: str, out: Path, is_main: bool) -> torch.Tensor:
    """Codes of one split, encoded once per VQ-VAE and cached atomically (uint16 .npy).

    Under torchrun rank 0 reads or builds the cache while the other ranks wait at a barrier, then they read
    its file: one encoder pass, no rank reads a half-written file, and every rank trains on the same codes.
    """
    codes = _load_or_encode(vqvae, args, split, out, write=is_main) if is_main else None
    barrier()
    if codes is None:  # another rank: rank 0 has written the cache by now
        codes = _load_or_encode(vqvae, args, split, out, write=False)
    return codes


def _load_or_encode(vqvae: VQVAE, args: argparse.Namespace, split: str, out: Path, write: bool) -> torch.Tensor:
    path = out / f"codes-{vqvae.fingerprint()}-{split}.npy"
    out.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        except (OSError, ValueError) as error:
            print(f"re-encoding {path.name}: unreadable cache ({error})")
    images = data.load_split(args.data_dir, split, args.seed, skip_bad=args.skip_bad).images
    codes = encode_array(vqvae, images)
    if write:
        atomic_write_bytes(path, lambda f: np.save(f, codes.numpy().astype(np.uint16), allow_pickle=False))
    return codes


def evaluate_nll(prior: GatedPixelCNN, codes: torch.Tensor, runtime, batch_size: int) -> dict[str, float]:
    """Mean NLL (nats per code) and top-1 accuracy over the validation codes, sharded across ranks."""
    def measure(batch: torch.Tensor) -> dict[str, float]:
        with autocast(runtime.device):
            nll, acc = prior.loss(batch)
        return {"nll": float(nll) * len(batch), "acc": float(acc) * len(batch)}

    shard = codes[runtime.rank::runtime.world_size]
    return sharded_means(prior, shard.split(batch_size), runtime, ("nll", "acc"), measure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runtime = setup_runtime(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vqvae = VQVAE.from_pretrained(args.vqvae, map_location=str(runtime.device))
    codes_dir = Path(args.codes_dir) if args.codes_dir else out
    train_codes = cached_codes(vqvae, args, "train", codes_dir, runtime.is_main)
    val_codes = cached_codes(vqvae, args, "val", codes_dir, runtime.is_main)
    unigram = entropy_bits(code_histogram(train_codes, vqvae.cfg.num_codes))
    if runtime.is_main:
        print(f"codes: train {tuple(train_codes.shape)} val {tuple(val_codes.shape)}; unigram {unigram:.3f} bits/code; "
              f"device {runtime.device}, world size {runtime.world_size}")

    cfg = PixelCNNConfig(num_codes=vqvae.cfg.num_codes, grid_size=vqvae.grid_size(), channels=args.channels,
                         embed_dim=args.embed_dim, num_layers=args.layers, first_kernel=args.first_kernel,
                         max_dilation=args.max_dilation, pos_dim=args.pos_dim)
    model = GatedPixelCNN(cfg).to(runtime.device, memory_format=memory_format(runtime.device))  # channels_last on CUDA
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history: list[dict] = []
    best_nll, start_epoch = math.inf, 0
    if args.resume:
        state = resume_run(out, model, optimizer, runtime)
        history, best_nll, start_epoch = state["history"], state["best_nll"], state["epoch"] + 1
    # DDP under torchrun (static graph: the last layer's vertical output is never used); `model` is evaluated
    # and saved.
    net = wrap_model(model, runtime, compile=args.compile, static_graph=True)
    scaler = grad_scaler(runtime.device)  # loss scaling only for fp16 autocast on GPUs without bf16

    meta = {"vqvae": {"path": str(args.vqvae), "fingerprint": vqvae.fingerprint()},
            "data": vqvae.meta.get("data", {}),
            "train": {k: v for k, v in vars(args).items() if k not in ("data_dir", "out", "codes_dir", "resume", "vqvae")}}
    dataset = torch.utils.data.TensorDataset(train_codes)
    # Same sampler with or without torchrun: global batch s holds the same grids at any world size.
    loader = data.make_loader(dataset, args.batch_size, shuffle=True, seed=args.seed,
                              distributed=runtime.distributed, drop_last=True)
    steps_per_epoch = min(len(loader), args.max_steps or len(loader))
    for epoch in range(start_epoch, args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, args)
        loader.sampler.set_epoch(epoch)  # reshuffle: the order depends on (seed, epoch) only
        sums = {"nll": 0.0, "acc": 0.0, "n": 0.0}
        started = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not runtime.is_main, leave=False,
                   dynamic_ncols=True)
        for step, (batch,) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            batch = batch.to(runtime.device)
            with autocast(runtime.device):
                logits = net(batch)
                nll = torch.nn.functional.cross_entropy(logits.float(), batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(nll).backward()  # DDP averages the ranks' gradients: the global-batch mean
            scaler.unscale_(optimizer)  # clip the true (all-reduced, unscaled) gradient, equal on every rank
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            acc = (logits.argmax(1) == batch).float().mean().item()
            sums["nll"] += nll.item() * len(batch)
            sums["acc"] += acc * len(batch)
            sums["n"] += len(batch)
            if step % 10 == 0:
                bar.set_postfix(bits=f"{nats_to_bits(nll.item()):.3f}", acc=f"{acc:.3f}")
        sums = reduce_sums(sums, runtime.device)
        val = evaluate_nll(model, val_codes, runtime, args.batch_size)
        record = {"epoch": epoch + 1, "train_bits": nats_to_bits(sums["nll"] / sums["n"]),
                  "val_bits": nats_to_bits(val["nll"]), "train_acc": sums["acc"] / sums["n"], "val_acc": val["acc"],
                  "unigram_bits": unigram, "lr": lr_at(epoch, args), "steps": steps_per_epoch,
                  "grids_per_s": sums["n"] / (time.time() - started)}
        history.append(record)
        if runtime.is_main:
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)
            if val["nll"] < best_nll:
                best_nll = val["nll"]
                write_snapshot(out, "best", f"{epoch + 1:04d}", lambda folder: model.save(
                    folder, vqvae.fingerprint(), **meta,
                    metrics={"val_bits_per_code": nats_to_bits(val["nll"]), "val_accuracy": val["acc"],
                             "unigram_bits_per_code": unigram, "epoch": epoch + 1}))

            def write_last(folder: Path) -> None:
                model.save(folder, vqvae.fingerprint(), **meta)
                checkpoint.save_training_state(folder, optimizer, {"epoch": epoch, "best_nll": best_nll,
                                                                   "history": history})

            write_snapshot(out, "last", f"{epoch + 1:04d}", write_last)
            write_history(out, history)
            plot_curves(history, [("train_bits", "val_bits"), ("train_acc", "val_acc")], out / "curves.png",
                        "PixelCNN prior training (bits per code, next-code accuracy)")
    teardown(runtime)
    return history[-1] if history else {}


if __name__ == "__main__":
    main()

"""Train the gated PixelCNN prior on the code grids of a trained VQ-VAE.

    python train/train_pixelcnn.py --vqvae runs/vqvae/best --data-dir ../shared/data/alzheimer4class --out runs/prior
    python train/train_pixelcnn.py --vqvae runs/vqvae/best --out runs/prior --resume     # continue a killed run
    torchrun --standalone --nproc_per_node 4 train/train_pixelcnn.py --vqvae checkpoints/vqvae --out runs/prior

The defaults are the shipped prior's architecture (checkpoints/pixelcnn; the README gives the commands that trained it). --batch-size is per process: the global batch is
batch size x processes (docs/multi-gpu.md). Only rank 0 encodes and writes the code cache and the run folder;
the other ranks wait for it and read.

The training and validation images are encoded once and cached in OUT/codes-<vqvae>-<data>-<split>.npy, keyed by
the VQ-VAE's fingerprint and by the data root, layout, --split-seed and --limit. OUT/best is a bundle the demo's
Models tab loads as it is: best/vqvae/ (the VQ-VAE the codes come from) and best/pixelcnn/ (the prior with the
best validation NLL). OUT/last is the last epoch's prior with its optimizer state (for --resume); curves in
OUT/curves.png.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq import data  # noqa: E402
from brainvq.io import atomic_write_bytes  # noqa: E402
from brainvq.metrics import code_histogram, entropy_bits, nats_to_bits  # noqa: E402
from brainvq.pixelcnn import GatedPixelCNN, PixelCNNConfig, grow  # noqa: E402
from brainvq.training import (autocast, barrier, common_args, data_meta, fit, load_splits,  # noqa: E402
                              memory_format, seed_everything, setup_runtime, sharded_means, teardown)
from brainvq.vqvae import VQVAE, encode_array  # noqa: E402

# ----------------------------------------------------------------------------- defaults (the shipped architecture)
CHANNELS = 48
LAYERS = 10
EMBED_DIM = 48
POS_DIM = 16
MAX_DILATION = 32
ZOOM = "1"
EPOCHS = 10
BATCH_SIZE = 16
LR = 2e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p, out="runs/prior", epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR)
    p.add_argument("--vqvae", default="checkpoints/vqvae", help="VQ-VAE checkpoint folder whose codes are modelled")
    p.add_argument("--codes-dir", help="where encoded codes are cached (default: the run folder)")
    p.add_argument("--channels", type=int, default=CHANNELS)
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--embed-dim", type=int, default=EMBED_DIM)
    p.add_argument("--pos-dim", type=int, default=POS_DIM, help="positional map channels; 0 disables it")
    p.add_argument("--max-dilation", type=int, default=MAX_DILATION, help="1 disables dilation")
    p.add_argument("--first-kernel", type=int, default=7)
    p.add_argument("--zoom", type=zoom_factors, default=ZOOM,
                   help="comma-separated zoom factors: every training slice is also encoded zoomed about its centre "
                        "by each (e.g. 0.9,1,1.1), so the prior learns brains of other sizes; validation stays unzoomed")
    p.add_argument("--grow-from", help="start from this trained prior, grown to --layers/--max-dilation without "
                                       "changing what it computes (pixelcnn.grow); ignored with --resume")
    return p.parse_args(argv)


def zoom_factors(text: str) -> list[float]:
    """``--zoom``'s comma-separated factors, each between 0.5 and 2."""
    try:
        zooms = [float(z) for z in text.split(",")]
    except ValueError:
        zooms = []
    if not zooms or not all(0.5 <= z <= 2 for z in zooms):
        raise argparse.ArgumentTypeError(f"takes comma-separated factors between 0.5 and 2, such as 0.9,1,1.1; "
                                         f"got {text!r}")
    return zooms


def cached_codes(vqvae: VQVAE, args: argparse.Namespace, slices: data.SliceSet, split: str, folder: Path,
                 is_main: bool, zoom: float = 1.0) -> torch.Tensor:
    """Codes of one split, zoomed by ``zoom`` (data.zoom_frames), encoded once and cached atomically (uint16 .npy)
    under a name that holds the VQ-VAE's fingerprint and a hash of the data root, layout, split seed, limit and
    zoom: any other choice encodes afresh.

    Under torchrun rank 0 reads or builds the cache while the other ranks wait at a barrier, then they read
    its file: one encoder pass, no rank reads a half-written file, and every rank trains on the same codes.
    """
    key = f"{Path(slices.root).resolve()}|{slices.layout}|split-seed {args.split_seed}|limit {args.limit}"
    if zoom != 1:
        key += f"|zoom {zoom:g}"
    path = folder / f"codes-{vqvae.fingerprint()}-{hashlib.sha256(key.encode()).hexdigest()[:8]}-{split}.npy"
    codes = _load_or_encode(vqvae, slices, split, path, zoom, write=True) if is_main else None
    barrier()
    if codes is None:  # another rank: rank 0 has written the cache by now
        codes = _load_or_encode(vqvae, slices, split, path, zoom, write=False)
    return codes


def _load_or_encode(vqvae: VQVAE, slices: data.SliceSet, split: str, path: Path, zoom: float,
                    write: bool) -> torch.Tensor:
    if path.exists():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        except (OSError, ValueError) as error:
            print(f"re-encoding {path.name}: unreadable cache ({error})")
    images = data.zoom_frames(slices.images, zoom)
    label = f"encoding {split} codes" + (f" (zoom {zoom:g})" if zoom != 1 else "")
    codes = encode_array(vqvae, images, progress=label if write else None)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, lambda f: np.save(f, codes.numpy().astype(np.uint16), allow_pickle=False))
    return codes


def evaluate_nll(prior: GatedPixelCNN, codes: torch.Tensor, runtime, batch_size: int) -> dict[str, float]:
    """Validation bits per code and top-1 accuracy, sharded across ranks."""
    def measure(batch: torch.Tensor) -> dict[str, float]:
        with autocast(runtime.device):
            nll, acc = prior.loss(batch)
        return {"nll": float(nll) * len(batch), "acc": float(acc) * len(batch)}

    batches = codes[runtime.rank::runtime.world_size].split(batch_size)
    means = sharded_means(prior, batches, len(batches), runtime, ("nll", "acc"), measure)
    return {"val_bits": nats_to_bits(means["nll"]), "val_acc": means["acc"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runtime = setup_runtime(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vqvae = VQVAE.from_pretrained(args.vqvae, map_location=str(runtime.device))
    codes_dir = Path(args.codes_dir) if args.codes_dir else out
    train_set, val_set = load_splits(args, runtime)
    train_codes = torch.cat([cached_codes(vqvae, args, train_set, "train", codes_dir, runtime.is_main, zoom)
                             for zoom in args.zoom])
    val_codes = cached_codes(vqvae, args, val_set, "val", codes_dir, runtime.is_main)
    unigram = entropy_bits(code_histogram(train_codes, vqvae.cfg.num_codes))
    if runtime.is_main:
        print(f"codes: train {tuple(train_codes.shape)} val {tuple(val_codes.shape)}; unigram {unigram:.3f} bits/code; "
              f"device {runtime.device}, world size {runtime.world_size}")

    cfg = PixelCNNConfig(num_codes=vqvae.cfg.num_codes, grid_size=vqvae.grid_size(), channels=args.channels,
                         embed_dim=args.embed_dim, num_layers=args.layers, first_kernel=args.first_kernel,
                         max_dilation=args.max_dilation, pos_dim=args.pos_dim)
    grown = args.grow_from and not args.resume
    model = grow(GatedPixelCNN.from_pretrained(args.grow_from, vqvae=vqvae), cfg) if grown else GatedPixelCNN(cfg)
    model = model.to(runtime.device, memory_format=memory_format(runtime.device))  # channels_last on CUDA
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    meta = {"vqvae": {"path": str(args.vqvae), "fingerprint": vqvae.fingerprint()},
            "data": data_meta(args, train_set, val_set),
            "train": {k: v for k, v in vars(args).items()
                      if k not in ("data_dir", "out", "codes_dir", "resume", "vqvae")}}
    # Same sampler with or without torchrun: global batch s holds the same grids at any world size.
    loader = data.make_loader(train_codes, args.batch_size, shuffle=True, seed=args.seed,
                              distributed=runtime.distributed, drop_last=True)

    def step(net: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batch.to(runtime.device)
        with autocast(runtime.device):
            logits = net(batch)
            nll = torch.nn.functional.cross_entropy(logits.float(), batch)
        acc = (logits.argmax(1) == batch).float().mean().item()
        return nll, {"bits": nats_to_bits(nll.item()), "acc": acc}

    def save_best(folder: Path, record: dict) -> None:
        """A bundle: the VQ-VAE the codes come from, beside the prior."""
        vqvae.save(folder / "vqvae", **{k: v for k, v in vqvae.meta.items()
                                        if k not in ("kind", "arch", "fingerprint")})
        model.save(folder / "pixelcnn", vqvae.fingerprint(), **meta, metrics={
            "val_bits_per_code": record["val_bits"], "val_accuracy": record["val_acc"],
            "unigram_bits_per_code": unigram, "epoch": record["epoch"]})

    # DDP under torchrun (static graph: the last layer's vertical output is never used); `model` is evaluated
    # and saved.
    history = fit(model, optimizer, loader, args, runtime, step=step,
                  validate=lambda: evaluate_nll(model, val_codes, runtime, args.batch_size),
                  save_best=save_best, save_last=lambda folder: model.save(folder, vqvae.fingerprint(), **meta),
                  best="val_bits", higher_is_better=False, wrap={"static_graph": True}, clip=1.0, rate="grids_per_s",
                  curves=[("train_bits", "val_bits"), ("train_acc", "val_acc")],
                  title="PixelCNN prior training (bits per code, next-code accuracy)",
                  after_epoch=lambda: {"unigram_bits": unigram})
    teardown(runtime)
    return history[-1] if history else {}


if __name__ == "__main__":
    main()

"""Train the BrainVQ VQ-VAE.

    python train/train_vqvae.py --data-dir ../shared/data/alzheimer4class --out runs/vqvae
    python train/train_vqvae.py --out runs/vqvae --resume            # continue a killed run
    torchrun --standalone --nproc_per_node 4 train/train_vqvae.py --out runs/vqvae  # 4 GPUs, same code

--batch-size is per process: the global batch is batch size x processes (docs/multi-gpu.md). Only rank 0
writes files; with the same global batch, N processes train the same model as one, up to float rounding.

Keeps the best model by validation SSIM in OUT/best, the last epoch (with optimizer state) in OUT/last,
curves in OUT/curves.png and a results figure in OUT/results.png.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq import checkpoint, data  # noqa: E402
from brainvq.metrics import code_histogram, perplexity, ssim  # noqa: E402
from brainvq.training import (autocast, check_in_sync, grad_scaler, memory_format, plot_curves,  # noqa: E402
                              rank0_first, reduce_sums, reduce_tensor, resume_run, seed_everything, sharded_means,
                              setup_runtime, teardown, wrap_model, write_history, write_snapshot)
from brainvq.visualize import save_triptych_figure  # noqa: E402
from brainvq.vqvae import VQVAE, VQVAEConfig  # noqa: E402

# ----------------------------------------------------------------------------- defaults (the shipped run)
NUM_CODES = 512         # K
CODE_DIM = 32           # D
HALVINGS = 2            # 256 -> 64x64 code grid
WIDTHS = "64,128"       # channels after each halving
RES_WIDTH = 64
EPOCHS = 24
BATCH_SIZE = 16
CROP = 128              # train on random 128x128 crops (4x cheaper); validate and test on full 256x256
LR = 1e-3
SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="OASIS keras_png_slices_data or an image folder (default $BRAINVQ_DATA)")
    p.add_argument("--out", default="runs/vqvae", help="run folder")
    p.add_argument("--num-codes", "-K", type=int, default=NUM_CODES)
    p.add_argument("--code-dim", "-D", type=int, default=CODE_DIM)
    p.add_argument("--halvings", type=int, default=HALVINGS, help="stride-2 layers; grid = 256 / 2**n")
    p.add_argument("--widths", default=WIDTHS, help="comma-separated channels per halving (one per layer)")
    p.add_argument("--res-width", type=int, default=RES_WIDTH)
    p.add_argument("--res-blocks", type=int, default=2)
    p.add_argument("--l1-weight", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="per process; the global batch is this times the number of processes")
    p.add_argument("--crop", type=int, default=CROP, help="training crop size; 0 = full images")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--seed", type=int, default=SEED, help="fixes the split, the init and the shuffling")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step's model (for CUDA)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable images with a warning")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (smoke tests)")
    args = p.parse_args(argv)
    args.widths = tuple(int(w) for w in args.widths.split(","))
    if len(args.widths) == 1:
        args.widths = args.widths * args.halvings
    if len(args.widths) != args.halvings:
        p.error(f"--widths has {len(args.widths)} entries but --halvings is {args.halvings}")
    return args


def lr_at(epoch: int, args: argparse.Namespace) -> float:
    """Cosine decay from lr to lr/50 over the run; a function of the epoch alone, so resume needs no state."""
    progress = epoch / max(args.epochs - 1, 1)
    return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def validate(model: VQVAE, images, runtime, batch_size: int) -> dict[str, float]:
    """Mean loss and SSIM over full-size validation images, sharded across ranks."""
    def measure(batch: torch.Tensor) -> dict[str, float]:
        with autocast(runtime.device):
            out = model(batch)
        return {"loss": float(out.loss) * len(batch),
                "ssim": float(ssim(out.recon.float(), batch, per_image=True).sum())}

    shard = images[runtime.rank::runtime.world_size]
    return sharded_means(model, data.iter_batches(shard, batch_size), runtime, ("loss", "ssim"), measure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runtime = setup_runtime(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    # Rank 0 decodes and caches the images first; the other ranks then read its cache instead of racing it.
    train_set, val_set = rank0_first(runtime, lambda: [data.load_split(args.data_dir, split, args.seed,
                                                                       skip_bad=args.skip_bad)
                                                       for split in ("train", "val")])
    if runtime.is_main:
        print(f"data: {train_set.root} ({train_set.layout}) train {len(train_set)} / val {len(val_set)}, "
              f"device {runtime.device}, world size {runtime.world_size}")

    cfg = VQVAEConfig(num_codes=args.num_codes, code_dim=args.code_dim, widths=args.widths,
                      num_res_blocks=args.res_blocks, res_width=args.res_width, l1_weight=args.l1_weight)
    model = VQVAE(cfg).to(runtime.device, memory_format=memory_format(runtime.device))  # channels_last on CUDA
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history: list[dict] = []
    best_ssim, start_epoch = -1.0, 0
    if args.resume:
        state = resume_run(out, model, optimizer, runtime)
        history, best_ssim, start_epoch = state["history"], state["best_ssim"], state["epoch"] + 1
    # DDP under torchrun. The codebook buffers are kept equal by the quantiser's own all-reduces, so DDP need
    # not broadcast them; `model` (unwrapped) is what validation and checkpoints use.
    net = wrap_model(model, runtime, compile=args.compile, sync_buffers=False)
    scaler = grad_scaler(runtime.device)  # loss scaling only for fp16 autocast on GPUs without bf16

    dataset = data.SliceDataset(train_set.images, crop=args.crop or None, seed=args.seed)
    meta = {"data": {"root": Path(train_set.root).name, "layout": train_set.layout, "split_seed": args.seed,
                     "n_train": len(train_set), "n_val": len(val_set)},
            "train": {k: v for k, v in vars(args).items() if k not in ("data_dir", "out", "resume")}}
    # Same sampler with or without torchrun: global batch s holds the same images at any world size.
    loader = data.make_loader(dataset, args.batch_size, shuffle=True, seed=args.seed,
                              distributed=runtime.distributed, drop_last=True)
    for epoch in range(start_epoch, args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, args)
        dataset.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)  # reshuffle: the order depends on (seed, epoch) only
        counts = torch.zeros(cfg.num_codes, dtype=torch.long)
        sums = {"loss": 0.0, "ssim": 0.0, "n": 0.0}
        started = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not runtime.is_main, leave=False,
                   dynamic_ncols=True)
        for step, batch in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            batch = batch.to(runtime.device, memory_format=memory_format(runtime.device))
            with autocast(runtime.device):
                outputs = net(batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(outputs.loss).backward()  # DDP averages the ranks' gradients: the global-batch mean
            scaler.step(optimizer)
            scaler.update()
            batch_ssim = 1 - float(outputs.losses["ssim_loss"])
            counts += code_histogram(outputs.codes.cpu(), cfg.num_codes)
            sums["loss"] += outputs.loss.item() * len(batch)
            sums["ssim"] += batch_ssim * len(batch)
            sums["n"] += len(batch)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{outputs.loss.item():.4f}", ssim=f"{batch_ssim:.4f}",
                                used=int((counts > 0).sum()), ppl=f"{perplexity(counts):.0f}")
        sums = reduce_sums(sums, runtime.device)
        counts = reduce_tensor(counts, runtime.device)  # code usage over the global batch, not rank 0's share
        check_in_sync({f"quantizer.{name}": buffer for name, buffer in model.quantizer.named_buffers()})
        val = validate(model, val_set.images, runtime, args.batch_size)
        record = {"epoch": epoch + 1, "train_loss": sums["loss"] / sums["n"], "train_ssim": sums["ssim"] / sums["n"],
                  "val_loss": val["loss"], "val_ssim": val["ssim"], "codes_used": int((counts > 0).sum()),
                  "perplexity": perplexity(counts), "lr": lr_at(epoch, args),
                  "images_per_s": sums["n"] / (time.time() - started)}
        history.append(record)
        if runtime.is_main:
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)
            if val["ssim"] > best_ssim:
                best_ssim = val["ssim"]
                write_snapshot(out, "best", f"{epoch + 1:04d}", lambda folder: model.save(
                    folder, **meta, metrics={"val_ssim": val["ssim"], "epoch": epoch + 1}))

            def write_last(folder: Path) -> None:
                model.save(folder, **meta)
                checkpoint.save_training_state(folder, optimizer, {"epoch": epoch, "best_ssim": best_ssim,
                                                                   "history": history})

            write_snapshot(out, "last", f"{epoch + 1:04d}", write_last)
            write_history(out, history)
            plot_curves(history, [("train_loss", "val_loss"), ("train_ssim", "val_ssim")], out / "curves.png",
                        "VQ-VAE training")
    if runtime.is_main and (out / "best").exists():
        results_figure(out, args)
    teardown(runtime)
    return history[-1] if history else {}


@torch.no_grad()
def results_figure(out: Path, args: argparse.Namespace) -> None:
    """original | code grid | reconstruction for 6 random test slices, from the best model."""
    model = VQVAE.from_pretrained(out / "best")
    test = data.load_split(args.data_dir, "test", args.seed, skip_bad=args.skip_bad)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:6].sort().values
    images = next(data.iter_batches(test.images[pick.numpy()], 6))
    codes = model.encode(images)
    recons = model.decode(codes)
    scores = ssim(recons, images, per_image=True).tolist()
    save_triptych_figure(images, codes, recons, scores, model.cfg.num_codes, out / "results.png",
                         f"VQ-VAE on 6 random test slices ({test.layout}: {Path(test.root).name})")


if __name__ == "__main__":
    main()

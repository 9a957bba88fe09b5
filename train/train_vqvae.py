"""Train the BrainVQ VQ-VAE.

    python train/train_vqvae.py --data-dir ../shared/data/alzheimer4class --out runs/vqvae
    python train/train_vqvae.py --out runs/vqvae --resume            # continue a killed run
    python train/train_vqvae.py --out runs/smoke-vqvae --epochs 1 --max-steps 20 --limit 128   # smoke run
    torchrun --standalone --nproc_per_node 4 train/train_vqvae.py --out runs/vqvae  # 4 GPUs, same code

The defaults are the shipped run (checkpoints/vqvae). --batch-size is per process: the global batch is batch
size x processes (docs/multi-gpu.md). Only rank 0 writes files; with the same global batch, N processes train
the same model as one, up to float rounding.

Keeps the best model by validation SSIM in OUT/best, the last epoch (with optimizer state) in OUT/last,
curves in OUT/curves.png and a results figure in OUT/results.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq import data  # noqa: E402
from brainvq.metrics import code_histogram, perplexity, ssim  # noqa: E402
from brainvq.training import (autocast, check_in_sync, common_args, data_meta, fit, load_splits,  # noqa: E402
                              memory_format, reduce_tensor, seed_everything, setup_runtime, sharded_means,
                              teardown)
from brainvq.visualize import save_triptych_figure  # noqa: E402
from brainvq.vqvae import VQVAE, VQVAEConfig  # noqa: E402

# ----------------------------------------------------------------------------- defaults (the shipped run)
NUM_CODES = 512         # K
CODE_DIM = 32           # D
HALVINGS = 2            # 256 -> 64x64 code grid
WIDTHS = "64,128"       # channels after each halving
RES_WIDTH = 64
EPOCHS = 6
BATCH_SIZE = 16
CROP = 128              # train on random 128x128 crops (4x cheaper); validate and test on full 256x256
LR = 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p, out="runs/vqvae", epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR)
    p.add_argument("--num-codes", "-K", type=int, default=NUM_CODES)
    p.add_argument("--code-dim", "-D", type=int, default=CODE_DIM)
    p.add_argument("--halvings", type=int, default=HALVINGS, help="stride-2 layers; grid = 256 / 2**n")
    p.add_argument("--widths", default=WIDTHS, help="comma-separated channels per halving (one per layer)")
    p.add_argument("--res-width", type=int, default=RES_WIDTH)
    p.add_argument("--res-blocks", type=int, default=2)
    p.add_argument("--l1-weight", type=float, default=1.0)
    p.add_argument("--crop", type=int, default=CROP, help="training crop size; 0 = full images")
    args = p.parse_args(argv)
    args.widths = tuple(int(w) for w in args.widths.split(","))
    if len(args.widths) == 1:
        args.widths = args.widths * args.halvings
    if len(args.widths) != args.halvings:
        p.error(f"--widths has {len(args.widths)} entries but --halvings is {args.halvings}")
    return args


def validate(model: VQVAE, images, runtime, batch_size: int) -> dict[str, float]:
    """Mean loss and SSIM over full-size validation images, sharded across ranks."""
    def measure(batch: torch.Tensor) -> dict[str, float]:
        with autocast(runtime.device):
            out = model(batch)
        return {"loss": float(out.loss) * len(batch),
                "ssim": float(ssim(out.recon.float(), batch, per_image=True).sum())}

    shard = images[runtime.rank::runtime.world_size]
    means = sharded_means(model, data.iter_batches(shard, batch_size), -(-len(shard) // batch_size), runtime,
                          ("loss", "ssim"), measure)
    return {"val_loss": means["loss"], "val_ssim": means["ssim"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runtime = setup_runtime(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    train_set, val_set = load_splits(args, runtime)
    if runtime.is_main:
        print(f"data: {train_set.root} ({train_set.layout}) train {len(train_set)} / val {len(val_set)}, "
              f"device {runtime.device}, world size {runtime.world_size}")

    cfg = VQVAEConfig(num_codes=args.num_codes, code_dim=args.code_dim, widths=args.widths,
                      num_res_blocks=args.res_blocks, res_width=args.res_width, l1_weight=args.l1_weight)
    model = VQVAE(cfg).to(runtime.device, memory_format=memory_format(runtime.device))  # channels_last on CUDA
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    dataset = data.SliceDataset(train_set.images, crop=args.crop or None, seed=args.seed)
    meta = {"data": data_meta(args, train_set, val_set),
            "train": {k: v for k, v in vars(args).items() if k not in ("data_dir", "out", "resume")}}
    # Same sampler with or without torchrun: global batch s holds the same images at any world size.
    loader = data.make_loader(dataset, args.batch_size, shuffle=True, seed=args.seed,
                              distributed=runtime.distributed, drop_last=True)
    counts = torch.zeros(cfg.num_codes, dtype=torch.long)  # code usage over this epoch's training batches

    def before_epoch(epoch: int) -> None:
        dataset.set_epoch(epoch)  # crops depend on (seed, epoch, index)
        counts.zero_()

    def step(net: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with autocast(runtime.device):
            outputs = net(batch.to(runtime.device, memory_format=memory_format(runtime.device)))
        counts.add_(code_histogram(outputs.codes.cpu(), cfg.num_codes))
        return outputs.loss, {"loss": outputs.loss.item(), "ssim": 1 - float(outputs.losses["ssim_loss"])}

    def after_epoch() -> dict:
        check_in_sync({f"quantizer.{name}": buffer for name, buffer in model.quantizer.named_buffers()})
        total = reduce_tensor(counts, runtime.device)  # code usage over the global batch, not rank 0's share
        return {"codes_used": int((total > 0).sum()), "perplexity": perplexity(total)}

    # DDP under torchrun. The codebook buffers are kept equal by the quantiser's own all-reduces, so DDP need
    # not broadcast them; `model` (unwrapped) is what validation and checkpoints use.
    history = fit(model, optimizer, loader, args, runtime, step=step,
                  validate=lambda: validate(model, val_set.images, runtime, args.batch_size),
                  save_best=lambda folder, record: model.save(
                      folder, **meta, metrics={"val_ssim": record["val_ssim"], "epoch": record["epoch"]}),
                  save_last=lambda folder: model.save(folder, **meta),
                  best="val_ssim", higher_is_better=True, wrap={"sync_buffers": False},
                  curves=[("train_loss", "val_loss"), ("train_ssim", "val_ssim")], title="VQ-VAE training",
                  before_epoch=before_epoch, after_epoch=after_epoch,
                  postfix=lambda: {"used": int((counts > 0).sum()), "ppl": f"{perplexity(counts):.0f}"})
    if runtime.is_main and (out / "best").exists():
        results_figure(out, args)
    teardown(runtime)
    return history[-1] if history else {}


@torch.no_grad()
def results_figure(out: Path, args: argparse.Namespace) -> None:
    """original | code grid | reconstruction for 6 random test slices, from the best model."""
    model = VQVAE.from_pretrained(out / "best")
    test = data.load_split(args.data_dir, "test", skip_bad=args.skip_bad)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:6].sort().values
    images = next(data.iter_batches(test.images[pick.numpy()], 6))
    codes = model.encode(images)
    recons = model.decode(codes)
    scores = ssim(recons, images, per_image=True).tolist()
    save_triptych_figure(images, codes, recons, scores, model.cfg.num_codes, out / "results.png",
                         f"VQ-VAE on 6 random test slices ({test.layout}: {Path(test.root).name})")


if __name__ == "__main__":
    main()

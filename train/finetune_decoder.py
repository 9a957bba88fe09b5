"""Fine-tune the VQ-VAE's decoder against a patch critic, so that decoded slices carry real texture.

    python train/finetune_decoder.py --vqvae checkpoints/vqvae --data-dir ../shared/data/alzheimer4class --out runs/decoder
    python train/finetune_decoder.py --out runs/decoder --resume                 # continue a killed run
    python train/finetune_decoder.py --out runs/smoke-decoder --epochs 1 --max-steps 20 --limit 64   # smoke run

The encoder and the codebook stay frozen, so every code grid means what it meant and a prior trained on these codes
still fits (the VQ-VAE's fingerprint, a hash of the codebook, does not change). The decoder minimises
(1 - SSIM) + L1 + w * adversarial, with w the VQGAN adaptive weight (brainvq.adversarial) times --adv-weight; the
critic learns at the same rate in the same step. Both train on random --crop crops.

Each epoch validates on the validation split's full slices: SSIM over the frame, and texture inside the brain
against the real slices (median |Laplacian| ratio, 1 = as sharp as real; intensity Wasserstein-1). OUT/best keeps
the VQ-VAE of the epoch whose Laplacian ratio is nearest 1 among the epochs that hold --ssim-floor (an epoch under
the floor wins only if none holds it). OUT/last holds decoder, critic and optimizer state for --resume.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq import data  # noqa: E402
from brainvq.adversarial import (PatchCritic, adaptive_weight, decoder_adversarial_loss,  # noqa: E402
                                 hinge_critic_loss)
from brainvq.checkpoint import WEIGHTS_NAME, write_tensors  # noqa: E402
from brainvq.metrics import ssim  # noqa: E402
from brainvq.realism import intensity_distance, laplacian_in_brain  # noqa: E402
from brainvq.training import (common_args, data_meta, fit, load_splits, seed_everything,  # noqa: E402
                              setup_runtime, teardown)
from brainvq.vqvae import VQVAE  # noqa: E402

# ----------------------------------------------------------------------------- defaults (the shipped run)
EPOCHS = 10
BATCH_SIZE = 16
CROP = 128
LR = 1e-4
ADV_WEIGHT = 0.5        # times the adaptive weight
CRITIC_LR_SCALE = 4.0   # the critic learns 4x faster (TTUR, Heusel et al. 2017): at 1x it stayed near chance
SSIM_FLOOR = 0.97       # validation SSIM an epoch must hold to be kept as best


class DecoderGAN(nn.Module):
    """The VQ-VAE (only its decoder trains) and the critic; ``forward`` returns both players' summed loss."""

    def __init__(self, vqvae: VQVAE, critic: PatchCritic, adv_weight: float):
        super().__init__()
        self.vqvae, self.critic, self.adv_weight = vqvae, critic, adv_weight
        for module in (vqvae.encoder, vqvae.quantizer):
            module.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        codes = self.vqvae.encode(images)
        fake = self.vqvae.decoder(self.vqvae.quantizer.lookup(codes))
        reconstruction = (1 - ssim(fake, images)) + F.l1_loss(fake, images)
        adversarial = decoder_adversarial_loss(self.critic, fake)
        weight = adaptive_weight(reconstruction, adversarial, self.last_layer(), self.adv_weight)
        critic_loss = hinge_critic_loss(self.critic, images, fake)
        loss = reconstruction + weight * adversarial + critic_loss
        return loss, {"rec": reconstruction.item(), "adv": adversarial.item(), "w": weight.item(),
                      "critic": critic_loss.item()}

    def last_layer(self) -> torch.Tensor:
        return [m for m in self.vqvae.decoder.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1].weight


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p, out="runs/decoder", epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR)
    p.add_argument("--vqvae", default="checkpoints/vqvae", help="the VQ-VAE whose decoder is fine-tuned")
    p.add_argument("--adv-weight", type=float, default=ADV_WEIGHT, help="scale of the adaptive adversarial weight")
    p.add_argument("--critic-lr-scale", type=float, default=CRITIC_LR_SCALE,
                   help="the critic's learning rate over the decoder's (two time-scale update rule)")
    p.add_argument("--ssim-floor", type=float, default=SSIM_FLOOR)
    p.add_argument("--crop", type=int, default=CROP, help="training crop size; 0 = full images")
    return p.parse_args(argv)


@torch.no_grad()
def validate(vqvae: VQVAE, images: np.ndarray, batch_size: int, floor: float) -> dict[str, float]:
    """Reconstruction loss, frame SSIM and in-brain texture of the reconstructions of ``images``, and the selection key."""
    real, recon = [], []
    for batch in tqdm(data.iter_batches(images, batch_size), total=-(-len(images) // batch_size), desc="validation",
                      leave=False, dynamic_ncols=True):
        real.append(batch)
        recon.append(vqvae.decode(vqvae.encode(batch)))
    real, recon = torch.cat(real), torch.cat(recon)
    frame_ssim = float(ssim(recon, real, per_image=True).mean())
    rec = 1 - frame_ssim + float(F.l1_loss(recon, real))
    ratio = float(np.median(laplacian_in_brain(recon).numpy()) / np.median(laplacian_in_brain(real).numpy()))
    gap = abs(1 - ratio) + (0.0 if frame_ssim >= floor else 1.0)
    return {"val_rec": rec, "val_ssim": frame_ssim, "val_laplacian_ratio": ratio, "val_intensity_w1": intensity_distance(recon, real),
            "val_select": gap}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runtime = setup_runtime(args.device)
    seed_everything(args.seed)
    train_set, val_set = load_splits(args, runtime)
    vqvae = VQVAE.from_pretrained(args.vqvae).to(runtime.device)
    source = dict(vqvae.meta)
    model = DecoderGAN(vqvae, PatchCritic(), args.adv_weight).to(runtime.device)
    optimizer = torch.optim.Adam([{"params": list(vqvae.decoder.parameters())},
                                  {"params": list(model.critic.parameters()), "lr_scale": args.critic_lr_scale}],
                                 lr=args.lr, betas=(0.5, 0.9))
    dataset = data.SliceDataset(train_set.images, crop=args.crop or None, seed=args.seed)
    loader = data.make_loader(dataset, args.batch_size, shuffle=True, seed=args.seed,
                              distributed=runtime.distributed, drop_last=True)
    meta = {key: source[key] for key in ("data", "train") if key in source}
    meta["decoder_finetune"] = {"from": args.vqvae, "data": data_meta(args, train_set, val_set),
                                **{k: v for k, v in vars(args).items() if k not in ("data_dir", "out", "resume")}}

    def save_best(folder: Path, record: dict) -> None:
        vqvae.save(folder, **meta, metrics={key: record[key] for key in
                                            ("val_ssim", "val_laplacian_ratio", "val_intensity_w1", "epoch")})

    history = fit(model, optimizer, loader, args, runtime, step=lambda net, batch: net(batch.to(runtime.device)),
                  validate=lambda: validate(vqvae, val_set.images, args.batch_size, args.ssim_floor),
                  save_best=save_best, save_last=lambda folder: write_tensors(folder / WEIGHTS_NAME, model.state_dict()),
                  best="val_select", higher_is_better=False,
                  curves=[("train_rec", "val_rec")],
                  title="decoder fine-tuning", before_epoch=dataset.set_epoch)
    teardown(runtime)
    return history[-1] if history else {}


if __name__ == "__main__":
    main()

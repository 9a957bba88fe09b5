"""Evaluate shipped or freshly trained models on the test split.

    python -m brainvq.evaluate vqvae --checkpoint checkpoints/vqvae --data-dir DIR --json vqvae.json
    python -m brainvq.evaluate prior --vqvae checkpoints/vqvae --pixelcnn checkpoints/pixelcnn --data-dir DIR --json prior.json
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from brainvq import data
from brainvq.io import write_report
from brainvq.metrics import code_histogram, entropy_bits, nats_to_bits, perplexity, psnr, ssim
from brainvq.pixelcnn import GatedPixelCNN, code_nll
from brainvq.vqvae import VQVAE, encode_array


def original_boxes(slices: data.SliceSet) -> list[tuple[int, int, int, int]]:
    """Where each image's own pixels sit inside its padded 256x256 slice (reads file headers only)."""
    boxes = []
    for item in slices.items:
        with Image.open(Path(slices.root) / item.path) as image:
            width, height = image.size
        boxes.append(data.content_box((height, width)))
    return boxes


@torch.no_grad()
def evaluate_vqvae(model: VQVAE, slices: data.SliceSet, batch_size: int = 32) -> dict[str, float]:
    """SSIM (whole padded frame and original area only), PSNR and code usage over a split."""
    scores, unpadded, psnrs, counts = [], [], [], torch.zeros(model.cfg.num_codes, dtype=torch.long)
    boxes = original_boxes(slices)
    for start, batch in zip(range(0, len(slices), batch_size), data.iter_batches(slices.images, batch_size)):
        codes = model.encode(batch)
        recon = model.decode(codes)
        counts += code_histogram(codes, model.cfg.num_codes)
        scores += ssim(recon, batch, per_image=True).tolist()
        psnrs += psnr(recon, batch).tolist()
        for k in range(len(batch)):
            top, left, height, width = boxes[start + k]
            crop = (..., slice(top, top + height), slice(left, left + width))
            unpadded.append(float(ssim(recon[k:k + 1][crop], batch[k:k + 1][crop])))
    scores_np = np.array(scores)
    return {"n_images": len(scores), "ssim_mean": float(scores_np.mean()), "ssim_median": float(np.median(scores_np)),
            "ssim_min": float(scores_np.min()), "frac_ssim_gt_0_6": float((scores_np > 0.6).mean()),
            "psnr_mean": float(np.mean(psnrs)), "codes_used": int((counts > 0).sum()),
            "perplexity": perplexity(counts), "ssim_mean_unpadded": float(np.mean(unpadded))}


def code_area_masks(boxes: list[tuple[int, int, int, int]], grid: int, size: int = data.IMAGE_SIZE) -> torch.Tensor:
    """(N, grid, grid) bool: the code positions whose image patch lies wholly inside each image's original area."""
    patch = size // grid
    start = torch.arange(grid) * patch
    masks = torch.zeros(len(boxes), grid, grid, dtype=torch.bool)
    for k, (top, left, height, width) in enumerate(boxes):
        rows = (start >= top) & (start + patch <= top + height)
        cols = (start >= left) & (start + patch <= left + width)
        masks[k] = rows[:, None] & cols[None, :]
    return masks


@torch.no_grad()
def evaluate_prior(prior: GatedPixelCNN, test_codes: torch.Tensor, train_codes: torch.Tensor,
                   test_area: torch.Tensor, train_area: torch.Tensor, batch_size: int = 16,
                   subsets: dict[str, Sequence[int]] | None = None) -> dict:
    """Bits per code and next-code accuracy on test codes, over the whole grid and over the positions inside each
    slice's original (unpadded) area, beside unigram baselines from the train codes. ``subsets`` (name -> grid
    indices) adds the same figures for each subset under its name, from the same single pass of the prior.

    ``unigram_bits_per_code_in_brain`` is the cross-entropy, on the same test positions, of the code histogram of
    the train codes inside their own original area (add-one smoothed): what a model of code frequencies alone
    would pay there. Padding is nearly free to predict, so the in-brain figures are the ones that judge the prior.
    """
    nll, nll_area, correct = [], [], []
    for start in tqdm(range(0, len(test_codes), batch_size), desc="scoring codes", unit="batch"):
        batch, inside = test_codes[start:start + batch_size], test_area[start:start + batch_size]
        logits = prior(batch)
        per_code = code_nll(logits, batch).double()
        nll.append(per_code.flatten(1).sum(1))
        nll_area.append((per_code * inside).flatten(1).sum(1))
        correct.append((logits.argmax(1) == batch).flatten(1).sum(1))
    nll, nll_area, correct = torch.cat(nll), torch.cat(nll_area), torch.cat(correct)
    counts = code_histogram(train_codes[train_area], prior.cfg.num_codes).double() + 1
    unigram_nats = -(counts / counts.sum()).log()
    unigram_bits = entropy_bits(code_histogram(train_codes, prior.cfg.num_codes))

    def figures(index: torch.Tensor) -> dict[str, float]:
        codes, area = test_codes[index], test_area[index]
        in_brain = nats_to_bits(float(nll_area[index].sum()) / int(area.sum()))
        unigram_area = nats_to_bits(float(unigram_nats[codes[area]].mean()))
        return {"n_images": len(codes), "bits_per_code": nats_to_bits(float(nll[index].sum()) / codes.numel()),
                "unigram_bits_per_code": unigram_bits,
                "bits_per_code_in_brain": in_brain, "unigram_bits_per_code_in_brain": unigram_area,
                "in_brain_saving_over_unigram": 1 - in_brain / unigram_area,
                "in_brain_positions_per_grid": float(area.flatten(1).sum(1).float().mean()),
                "accuracy": float(correct[index].sum()) / codes.numel()}

    result: dict = figures(torch.arange(len(test_codes)))
    for name, index in (subsets or {}).items():
        result[name] = figures(torch.as_tensor(index, dtype=torch.long))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    vq = sub.add_parser("vqvae", help="reconstruction quality and code usage on the test split")
    vq.add_argument("--checkpoint", default="checkpoints/vqvae")
    pr = sub.add_parser("prior", help="bits per code and accuracy of the PixelCNN on the test split")
    pr.add_argument("--vqvae", default="checkpoints/vqvae")
    pr.add_argument("--pixelcnn", default="checkpoints/pixelcnn")
    for p in (vq, pr):
        p.add_argument("--data-dir", help="data root (default $BRAINVQ_DATA or ./keras_png_slices_data)")
        p.add_argument("--split-seed", type=int, default=0, help="train/validation split seed (only matters for "
                       "the train codes' unigram baseline)")
        p.add_argument("--json", required=True, help="where to write the figures")
    args = parser.parse_args(argv)
    test = data.load_split(args.data_dir, "test")
    if args.what == "vqvae":
        result = evaluate_vqvae(VQVAE.from_pretrained(args.checkpoint), test)
    else:
        vqvae = VQVAE.from_pretrained(args.vqvae)
        prior = GatedPixelCNN.from_pretrained(args.pixelcnn, vqvae=vqvae)
        train = data.load_split(args.data_dir, "train", args.split_seed)
        grid = vqvae.grid_size()
        result = evaluate_prior(prior, encode_array(vqvae, test.images, progress="encoding test codes"),
                                encode_array(vqvae, train.images, progress="encoding train codes"),
                                code_area_masks(original_boxes(test), grid), code_area_masks(original_boxes(train), grid))
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

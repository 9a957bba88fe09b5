"""How much does the prior mind the brain's size? Bits per code of one prior on validation slices zoomed about the
frame centre (data.zoom_frames) and on the test folder, over the whole grid and inside each slice's original area.

    python bench/prior_zoom.py --data-dir ../shared/data/alzheimer4class --pixelcnn checkpoints/pixelcnn --json bench/results/prior_zoom_shipped.json

The test folder's brains are about 7% smaller than the training ones and its subjects are unseen, while the
validation slices share subjects with training: the zoomed validation rows isolate the size. The in-area unigram
baseline is the training split's code histogram (unzoomed), as in ``python -m brainvq.evaluate prior``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "train"))

from brainvq import data  # noqa: E402
from brainvq.evaluate import code_area_masks, evaluate_prior, original_boxes  # noqa: E402
from brainvq.io import write_report  # noqa: E402
from brainvq.pixelcnn import GatedPixelCNN  # noqa: E402
from brainvq.vqvae import VQVAE, encode_array  # noqa: E402
import train_pixelcnn  # noqa: E402


def zoomed_boxes(boxes: list[tuple[int, int, int, int]], zoom: float) -> list[tuple[int, int, int, int]]:
    """Where each original area lies once its centred frame is zoomed by ``zoom``."""
    return [data.content_box((round(h * zoom), round(w * zoom))) for _, _, h, w in boxes]


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="data root (default $BRAINVQ_DATA or ./keras_png_slices_data)")
    p.add_argument("--vqvae", default="checkpoints/vqvae")
    p.add_argument("--pixelcnn", default="checkpoints/pixelcnn")
    p.add_argument("--zoom", type=train_pixelcnn.zoom_factors, default="0.9,1",
                   help="comma-separated zooms of the validation slices")
    p.add_argument("--codes-dir", default="runs/codes", help="cache of the training split's codes (train_pixelcnn)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    vqvae = VQVAE.from_pretrained(args.vqvae)
    prior = GatedPixelCNN.from_pretrained(args.pixelcnn, vqvae=vqvae).eval()
    grid = vqvae.grid_size()
    train_args = train_pixelcnn.parse_args(["--split-seed", str(args.split_seed)])
    train = data.load_split(args.data_dir, "train", args.split_seed)
    train_codes = train_pixelcnn.cached_codes(vqvae, train_args, train, "train", Path(args.codes_dir), is_main=True)
    train_area = code_area_masks(original_boxes(train), grid)
    val = data.load_split(args.data_dir, "val", args.split_seed)
    test = data.load_split(args.data_dir, "test")
    result = {"pixelcnn": args.pixelcnn, "split_seed": args.split_seed}
    val_boxes = original_boxes(val)
    for zoom in args.zoom:
        codes = encode_array(vqvae, data.zoom_frames(val.images, zoom), progress=f"encoding validation (zoom {zoom:g})")
        area = code_area_masks(zoomed_boxes(val_boxes, zoom), grid)
        result[f"val_zoom_{zoom:g}"] = evaluate_prior(prior, codes, train_codes, area, train_area)
        print(f"val_zoom_{zoom:g}", result[f"val_zoom_{zoom:g}"], flush=True)
    codes = encode_array(vqvae, test.images, progress="encoding test")
    result["test"] = evaluate_prior(prior, codes, train_codes, code_area_masks(original_boxes(test), grid), train_area)
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

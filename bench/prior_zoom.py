"""How much does the prior mind the brain's size? Bits per code of one prior on validation slices zoomed about the
frame centre (data.zoom_frames) and on the test folder, over the whole grid and inside each slice's original area.

    python bench/prior_zoom.py --data-dir ../shared/data/alzheimer4class --pixelcnn checkpoints/pixelcnn --json bench/results/prior_zoom_shipped.json

The test folder's brains are about 7% smaller than the training ones and its subjects are unseen, while the
validation slices share subjects with training: the zoomed validation rows isolate the size. The in-area unigram
baseline is the training split's code histogram (unzoomed), as in ``python -m brainvq.evaluate prior``.

``test`` also holds ``test_select`` and ``test_report``: the test folder cut in two by volume (data.volume_halves,
SELECT_SEED). The validation split leaks subjects, so it cannot judge a prior trained to generalise; choose
among priors on the selection half (subjects no prior has seen) and report the choice on the other half.
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
from brainvq.vqvae import VQVAE  # noqa: E402
import train_pixelcnn  # noqa: E402

SELECT_SEED = 0  # which test volumes form the selection half


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
    p.add_argument("--codes-dir", default="runs/codes", help="cache of the encoded splits (train_pixelcnn's)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    vqvae = VQVAE.from_pretrained(args.vqvae)
    prior = GatedPixelCNN.from_pretrained(args.pixelcnn, vqvae=vqvae).eval()
    grid = vqvae.grid_size()
    train_args = train_pixelcnn.parse_args(["--split-seed", str(args.split_seed)])
    train = data.load_split(args.data_dir, "train", args.split_seed)
    cache = Path(args.codes_dir)
    train_codes = train_pixelcnn.cached_codes(vqvae, train_args, train, "train", cache, is_main=True)
    train_area = code_area_masks(original_boxes(train), grid)
    val = data.load_split(args.data_dir, "val", args.split_seed)
    test = data.load_split(args.data_dir, "test")
    result = {"pixelcnn": args.pixelcnn, "split_seed": args.split_seed}
    val_boxes = original_boxes(val)
    for zoom in args.zoom:
        codes = train_pixelcnn.cached_codes(vqvae, train_args, val, "val", cache, is_main=True, zoom=zoom)
        area = code_area_masks(zoomed_boxes(val_boxes, zoom), grid)
        result[f"val_zoom_{zoom:g}"] = evaluate_prior(prior, codes, train_codes, area, train_area)
        print(f"val_zoom_{zoom:g}", result[f"val_zoom_{zoom:g}"], flush=True)
    codes = train_pixelcnn.cached_codes(vqvae, train_args, test, "test", cache, is_main=True)
    halves = dict(zip(("test_select", "test_report"), data.volume_halves(test.items, SELECT_SEED)))
    result["test"] = evaluate_prior(prior, codes, train_codes, code_area_masks(original_boxes(test), grid), train_area,
                                    subsets=halves)
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

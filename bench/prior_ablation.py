"""What do global context and position awareness buy the prior? Equal-budget ablation on the shipped VQ-VAE.

    python bench/prior_ablation.py --data-dir ../shared/data/alzheimer4class --steps 288 --json bench/results/prior_ablation_288.json

Trains four small priors for the same number of steps on the same cached codes, from the same seed:
  full        dilated vertical stack (global context) + learned positional map
  no_pos      dilation only
  no_dilation positional map only (receptive field grows 1 row / column per layer)
  neither     the plain gated PixelCNN
and reports each one's validation bits/code, and the one-component and whole-brain rates of 16 decoded
samples (temperature 1; brain-area band from the real train slices, as in bench/generation_quality.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq import data  # noqa: E402
from brainvq.io import write_report  # noqa: E402
from brainvq.metrics import brain_area_range, brain_region_table, whole_brain  # noqa: E402
from brainvq.pixelcnn import GatedPixelCNN  # noqa: E402
from brainvq.sampling import sample_codes  # noqa: E402
from brainvq.vqvae import VQVAE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import train_pixelcnn  # noqa: E402

# The architecture these figures were measured on (the prior shipped before issue 15), pinned so that the
# committed results stay reproducible whatever train_pixelcnn.py's defaults become.
ARCH = ["--channels", "48", "--layers", "8", "--embed-dim", "48", "--pos-dim", "16", "--max-dilation", "8"]
VARIANTS = {"full": [], "no_pos": ["--pos-dim", "0"], "no_dilation": ["--max-dilation", "1"],
            "neither": ["--pos-dim", "0", "--max-dilation", "1"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqvae", default=str(ROOT / "checkpoints/vqvae"))
    p.add_argument("--data-dir")
    p.add_argument("--out", default=str(ROOT / "runs/ablation"))
    p.add_argument("--codes-dir", help="cached codes to reuse (default OUT/codes), e.g. runs/pixelcnn")
    p.add_argument("--steps", type=int, default=150, help="training steps per variant (batch 16); at most one epoch (288)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    p.add_argument("--split-seed", type=int, default=0, help="train/validation split seed")
    p.add_argument("--json")
    args = p.parse_args(argv)
    vqvae = VQVAE.from_pretrained(args.vqvae)
    train = data.load_split(args.data_dir, "train", args.split_seed)  # the band the samples must hit: see generation_quality
    area_range = brain_area_range(brain_region_table(data.iter_batches(train.images, 256)))
    result: dict = {"batch_size": 16, "samples": args.samples}
    codes_dir = Path(args.codes_dir or Path(args.out) / "codes")  # encoded once, shared by every variant
    for name in args.variants.split(","):
        out = Path(args.out) / name
        argv_variant = ["--vqvae", args.vqvae, "--out", str(out), "--codes-dir", str(codes_dir), "--epochs", "1",
                        "--max-steps", str(args.steps), "--seed", str(args.seed), "--split-seed", str(args.split_seed),
                        *ARCH, *VARIANTS[name]]
        if args.data_dir:
            argv_variant += ["--data-dir", args.data_dir]
        record = train_pixelcnn.main(argv_variant)
        prior = GatedPixelCNN.from_pretrained(out / "best" / "pixelcnn", vqvae=vqvae)
        regions = brain_region_table([vqvae.decode(sample_codes(prior, n=args.samples, seed=args.seed))])
        result["steps"] = record["steps"]  # what ran: --steps is capped at one epoch (288 steps of 16 grids)
        result[name] = {"val_bits_per_code": record["val_bits"], "val_accuracy": record["val_acc"],
                        "single_component_rate": float((regions[:, 0] == 1).mean()),
                        "whole_brain_rate": float(whole_brain(regions, area_range).mean())}
        print(name, json.dumps(result[name]), flush=True)
    result["unigram_bits_per_code"] = record["unigram_bits"]
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

"""Time the naive and the cached (fast) PixelCNN samplers on the shipped models, in one process.

    python bench/sampling.py --json bench/results/sampling.json

Both samplers draw one full code grid from the same seed; the script checks the grids are identical, then
reports both times, their ratio, and the fast sampler's full grid + decode time (goal: <= 5 s on 2 cores,
fast >= 20x naive).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq.io import write_report  # noqa: E402
from brainvq.pixelcnn import GatedPixelCNN  # noqa: E402
from brainvq.sampling import sample_codes  # noqa: E402
from brainvq.vqvae import VQVAE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqvae", default=str(ROOT / "checkpoints/vqvae"))
    p.add_argument("--pixelcnn", default=str(ROOT / "checkpoints/pixelcnn"))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="where to write the figures")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    vqvae = VQVAE.from_pretrained(args.vqvae)
    prior = GatedPixelCNN.from_pretrained(args.pixelcnn, vqvae=vqvae)
    kwargs = dict(n=1, temperature=args.temperature, seed=args.seed)
    sample_codes(prior, method="fast", **kwargs)  # warm-up
    fast, fast_s = timed(lambda: sample_codes(prior, method="fast", **kwargs))
    image, decode_s = timed(lambda: vqvae.decode(fast))
    naive, naive_s = timed(lambda: sample_codes(prior, method="naive", **kwargs))
    grid = prior.cfg.grid_size
    result = {"grid": f"{grid}x{grid}", "positions": grid * grid, "threads": torch.get_num_threads(),
              "naive_s": round(naive_s, 2), "fast_s": round(fast_s, 3), "speedup": round(naive_s / fast_s, 1),
              "decode_s": round(decode_s, 3), "fast_plus_decode_s": round(fast_s + decode_s, 3),
              "identical_codes": bool(torch.equal(fast, naive)),
              "goal_speedup": 20, "goal_fast_plus_decode_s": 5.0}
    result["meets_goals"] = result["speedup"] >= 20 and result["fast_plus_decode_s"] <= 5.0 and result["identical_codes"]
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

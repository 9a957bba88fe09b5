"""Time the PixelCNN samplers on the shipped models, in one process.

    python bench/sampling.py --json bench/results/sampling.json
    python bench/sampling.py --random-prior 64,64,12,32 --skip-naive --json bench/results/sampling_12layers.json

Naive vs fast: both samplers draw one full code grid from the same seed; the script checks the grids are
identical, then reports both times, their ratio, and the fast sampler's full grid + decode time (the median of
``--repeats``; goals: <= 5 s on 2 cores, fast >= 20x naive).

Every run samples at the prior's default settings (``"sampling"`` in its config.json, chosen on validation), or at
``--temperature`` / ``--top-p`` when given. Batching: the batched sampler draws ``--batches`` grids together
(one request each, seeds 0..n-1) and reports
the seconds per full set of grids and per step; the median of ``--repeats``. ``--threads`` (torch threads) defaults
to 1, what the demo's sampler process runs (``app.py --threads``); on this 2-core machine one thread was faster
than two at 1 and 16 grids (README).
``--random-prior CHANNELS,EMBED,LAYERS,MAX_DILATION`` times a randomly initialised prior of that shape instead
of the shipped one (speed does not depend on the weights).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq.io import write_report  # noqa: E402
from brainvq.pixelcnn import GatedPixelCNN, PixelCNNConfig  # noqa: E402
from brainvq.sampling import BatchSampler, default_settings, sample_codes  # noqa: E402
from brainvq.vqvae import VQVAE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def random_prior(vqvae: VQVAE, shape: str, seed: int = 0) -> GatedPixelCNN:
    """A randomly initialised prior over ``vqvae``'s codes, shaped CHANNELS,EMBED,LAYERS,MAX_DILATION: its speed
    is that of a trained one."""
    channels, embed, layers, dilation = map(int, shape.split(","))
    torch.manual_seed(seed)
    return GatedPixelCNN(PixelCNNConfig(num_codes=vqvae.cfg.num_codes, grid_size=vqvae.grid_size(), channels=channels,
                                        embed_dim=embed, num_layers=layers, max_dilation=dilation)).eval()


def batched(prior: GatedPixelCNN, grids: int, settings: dict) -> float:
    """Seconds to sample ``grids`` one-grid requests together at ``settings`` (temperature, top_k, top_p)."""
    sampler = BatchSampler(prior)
    for seed in range(grids):
        sampler.add(n=1, seed=seed, **settings)
    start = time.perf_counter()
    while sampler.busy:
        sampler.step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqvae", default=str(ROOT / "checkpoints/vqvae"))
    p.add_argument("--pixelcnn", default=str(ROOT / "checkpoints/pixelcnn"))
    p.add_argument("--random-prior", help="CHANNELS,EMBED,LAYERS,MAX_DILATION: time a random prior of this shape")
    p.add_argument("--temperature", type=float, help="default: the prior's config")
    p.add_argument("--top-p", type=float, help="default: the prior's config (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the demo's sampler)")
    p.add_argument("--batches", default="1,4,16,64", help="numbers of grids sampled together")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-naive", action="store_true", help="skip the naive sampler (minutes per grid)")
    p.add_argument("--json", help="where to write the figures")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    vqvae = VQVAE.from_pretrained(args.vqvae)
    if args.random_prior:
        prior = random_prior(vqvae, args.random_prior, args.seed)
        prior_name = f"random {args.random_prior} (channels,embed,layers,max_dilation)"
    else:
        prior = GatedPixelCNN.from_pretrained(args.pixelcnn, vqvae=vqvae)
        prior_name = args.pixelcnn
    settings = default_settings(prior)
    settings.update({k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None})
    kwargs = dict(n=1, seed=args.seed, **settings)
    sample_codes(prior, method="fast", **kwargs)  # warm-up
    runs = [timed(lambda: sample_codes(prior, method="fast", **kwargs)) for _ in range(args.repeats)]
    fast, fast_s = runs[0][0], statistics.median(seconds for _, seconds in runs)
    image, decode_s = timed(lambda: vqvae.decode(fast))
    grid = prior.cfg.grid_size
    result = {"prior": prior_name, "sampling": settings, "grid": f"{grid}x{grid}", "positions": grid * grid,
              "threads": torch.get_num_threads(), "fast_s": round(fast_s, 3), "decode_s": round(decode_s, 3),
              "fast_plus_decode_s": round(fast_s + decode_s, 3), "goal_fast_plus_decode_s": 5.0}
    if not args.skip_naive:
        naive, naive_s = timed(lambda: sample_codes(prior, method="naive", **kwargs))
        result.update(naive_s=round(naive_s, 2), speedup=round(naive_s / fast_s, 1),
                      identical_codes=bool(torch.equal(fast, naive)), goal_speedup=20)
        result["meets_goals"] = (result["speedup"] >= 20 and result["fast_plus_decode_s"] <= 5.0
                                 and result["identical_codes"])
    result["batched_s"] = {}
    for grids in map(int, args.batches.split(",")):
        seconds = statistics.median(batched(prior, grids, settings) for _ in range(args.repeats))
        result["batched_s"][grids] = {"all_grids_s": round(seconds, 2), "ms_per_step": round(seconds / grid**2 * 1e3, 3)}
        print(f"{grids} grids together: {seconds:.2f} s", file=sys.stderr)
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

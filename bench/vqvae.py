"""Benchmark the VQ-VAE on the CPU: training throughput and single-slice encode+decode latency.

    python bench/vqvae.py                         # all cores, checkpoints/vqvae if present
    python bench/vqvae.py --threads 1 --json bench/vqvae.json

Training throughput is measured as images/s of full train steps (forward, backward, Adam step, EMA codebook
update) at batch 16 on random 128x128 crops (how the shipped model trains) and on full 256x256 slices, after a
few warm-up steps. Latency is encode() then decode() of ONE 256x256 slice under torch.no_grad(), the median of
``--runs`` timed runs after warm-up. The model is the checkpoint at ``--checkpoint`` when it holds a
config.json, else a freshly initialised default VQVAEConfig (same architecture and cost, untrained weights).
Progress goes to stderr; the figures go to ``--json`` (atomically) and, last, to stdout as one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq.checkpoint import CONFIG_NAME  # noqa: E402
from brainvq.io import write_report  # noqa: E402
from brainvq.vqvae import VQVAE, VQVAEConfig  # noqa: E402

GOAL_LATENCY_MS = 100.0
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "vqvae"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="VQ-VAE checkpoint folder (default checkpoints/vqvae; the default config if absent)")
    p.add_argument("--threads", type=int, default=available_cores(), help="torch CPU threads (default: all cores)")
    p.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2, help="untimed train steps / latency runs first")
    p.add_argument("--steps", type=int, default=5, help="timed train steps per image size")
    p.add_argument("--runs", type=int, default=20, help="timed single-slice latency runs")
    return p.parse_args(argv)


def synthetic_slices(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n,1,size,size) brain-like slices in [0,1]: noisy background, a bright ellipse with a brighter core."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    out = rng.uniform(0.0, 0.1, size=(n, 1, size, size)).astype(np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0.42, 0.58, 2) * size
        ry, rx = rng.uniform(0.30, 0.40, 2) * size
        radius = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2
        out[i, 0] += 0.55 * (radius <= 1) + 0.25 * (radius <= 0.3)
    return torch.from_numpy(out.clip(0, 1))


def load_model(folder: str | None) -> tuple[VQVAE, str]:
    if folder and (Path(folder) / CONFIG_NAME).is_file():
        return VQVAE.from_pretrained(folder), str(folder)
    return VQVAE(VQVAEConfig()), "default VQVAEConfig (untrained; no checkpoint found)"


def train_throughput(model: VQVAE, size: int, batch_size: int, warmup: int, steps: int) -> dict:
    """Images/s of full optimisation steps on ``size`` x ``size`` batches (a private copy of the model)."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = [synthetic_slices(batch_size, size, seed=i) for i in range(2)]
    times = []
    for step in range(warmup + steps):
        batch = batches[step % 2]
        started = time.perf_counter()
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - started
        if step >= warmup:
            times.append(elapsed)
        print(f"  train {size}x{size} step {step + 1}/{warmup + steps}: {elapsed:.3f} s"
              + ("" if step >= warmup else " (warm-up)"), file=sys.stderr, flush=True)
    return {"images_per_s": batch_size * len(times) / sum(times), "step_s_median": statistics.median(times)}


@torch.no_grad()
def latency(model: VQVAE, warmup: int, runs: int) -> dict:
    """Encode+decode of one 256x256 slice, in milliseconds."""
    model = model.eval()
    image = synthetic_slices(1, 256, seed=123)
    times = []
    for run in range(warmup + runs):
        started = time.perf_counter()
        recon = model.decode(model.encode(image))
        elapsed = (time.perf_counter() - started) * 1000
        if run >= warmup:
            times.append(elapsed)
    assert recon.shape == image.shape
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    model, source = load_model(args.checkpoint)
    print(f"model: {source}; {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{args.threads} thread(s)", file=sys.stderr, flush=True)

    lat = latency(model, max(args.warmup, 3), args.runs)
    print(f"  latency median {lat['median']:.1f} ms", file=sys.stderr, flush=True)
    crop = train_throughput(model, 128, args.batch_size, args.warmup, args.steps)
    full = train_throughput(model, 256, args.batch_size, args.warmup, args.steps)

    figures = {
        "benchmark": "vqvae",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cores_available": available_cores(),
        "load_average_1min_before": round(load_before[0], 2) if load_before else None,
        "model": source,
        "arch": asdict(model.cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "train_images_per_s_crop128": round(crop["images_per_s"], 2),
        "train_step_s_crop128": round(crop["step_s_median"], 4),
        "train_images_per_s_full256": round(full["images_per_s"], 2),
        "train_step_s_full256": round(full["step_s_median"], 4),
        "latency_runs": args.runs,
        "latency_ms_median": round(lat["median"], 2),
        "latency_ms_min": round(lat["min"], 2),
        "latency_ms_max": round(lat["max"], 2),
        "goal_latency_ms": int(GOAL_LATENCY_MS),
        "meets_latency_goal": bool(lat["median"] <= GOAL_LATENCY_MS),
    }
    return write_report(figures, args.json_out)


if __name__ == "__main__":
    main()

"""What the demo's design choices save, measured on the shipped models in one process (1 torch thread).

    python bench/demo_costs.py --json bench/results/demo_costs.json

* GIL: one step of the batched sampler over 16 requests x 4 grids, alone and while one other thread runs
  plain Python: why the sampler runs in a process of its own (brainvq/sampler_process.py).
* Live view: encoding one frame of 4 half-sampled grids as PNG and as JPEG (PIL defaults, as Gradio saves them).
* Per-code NLL of one 64x64 grid: F.cross_entropy over the NCHW channels against brainvq.pixelcnn.code_nll.

Medians of ``--repeats``; the sampler's step beside a busy thread over fewer steps, as each takes seconds.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brainvq import generation, hub  # noqa: E402
from brainvq.io import write_report  # noqa: E402
from brainvq.pixelcnn import code_nll  # noqa: E402
from brainvq.sampling import BatchSampler, sample  # noqa: E402


def median_ms(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return round(1000 * statistics.median(times), 2)


def step_ms(prior, steps: int, busy: bool) -> float:
    """Mean ms per step over ``steps`` steps of 16 requests x 4 grids, optionally beside a busy Python thread."""
    sampler = BatchSampler(prior)
    for seed in range(16):
        sampler.add(4, seed=seed)
    sampler.step()                                   # admits the requests and starts the row
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    other = threading.Thread(target=spin, daemon=True)
    if busy:
        other.start()
    try:
        began = time.perf_counter()
        for _ in range(steps):
            sampler.step()
        return round(1000 * (time.perf_counter() - began) / steps, 2)
    finally:
        stop.set()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--busy-steps", type=int, default=8, help="sampler steps timed beside the busy thread")
    p.add_argument("--json", help="where to write the figures")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    bundle = hub.load_bundle(args.checkpoints)
    prior, vqvae = bundle.prior, bundle.vqvae

    with torch.no_grad():
        alone = step_ms(prior, 64, busy=False)
        beside = step_ms(prior, args.busy_steps, busy=True)
        half = next(p for p in sample(prior, 4, seed=0) if p.filled >= 2048)
        look = generation.code_look(vqvae)
        frame = Image.fromarray(generation.live_view(half, generation.LiveDecoder(vqvae, look, 4).update(half), look))
        encode = {fmt: median_ms(lambda fmt=fmt: frame.save(io.BytesIO(), fmt), args.repeats) for fmt in ("png", "jpeg")}
        codes = torch.randint(0, prior.cfg.num_codes, (1, prior.cfg.grid_size, prior.cfg.grid_size),
                              generator=torch.Generator().manual_seed(0))
        logits = prior(codes)
        nll = {"cross_entropy_nchw": median_ms(lambda: F.cross_entropy(logits, codes, reduction="none"),
                                               args.repeats),
               "code_nll": median_ms(lambda: code_nll(logits, codes), args.repeats)}
        difference = float((F.cross_entropy(logits, codes, reduction="none") - code_nll(logits, codes)).abs().max())

    result = {"checkpoints": str(args.checkpoints), "threads": 1, "repeats": args.repeats,
              "sampler_step_ms": {"alone": alone, "beside_a_busy_python_thread": beside,
                                  "grids": 64, "busy_steps": args.busy_steps},
              "live_view_frame_encode_ms": {**encode, "frame": list(frame.size)},
              "per_code_nll_ms": {**nll, "max_abs_difference_nats": difference}}
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

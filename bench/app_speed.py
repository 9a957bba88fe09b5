"""How fast the demo feels: cold start, one reconstruction, and the first streamed frame of a generation.

    python bench/app_speed.py --json bench/results/app_speed.json       # shipped weights (checkpoints/)
    python bench/app_speed.py --checkpoints DIR                           # any bundle folder (vqvae/ + pixelcnn/)

* Cold start: ``python app.py --offline --port P`` spawned as a subprocess, timed until GET / answers HTTP 200
  (interpreter start, imports, model and sample loading, building the UI). ``--starts N``: median of N spawns.
* Reconstruction: the median of ``--runs`` (10) gradio_client calls of /reconstruct_sample on a bundled slice,
  after one warm-up call; wall time at the client, one request at a time. The client shares one TLS context over
  its requests, as a browser does (``--fresh-tls``: one per request, gradio_client's default, ~33 ms each).
  gradio_client reads the answer in 50 ms polls (gradio_client 2.7: its SSE reader sleeps 0.05 s while no
  message is pending), so the figure is an upper bound that moves in 50 ms steps.
* First frame: ``client.submit`` of /generate (n=1, temperature 1, top-k and top-p off), time until the first
  intermediate output (a partly filled code grid) reaches the client; the median of ``--generations`` (3). The
  time to the finished sample is reported too.

Goals: cold start <= 15 s, reconstruction <= 0.5 s, first frame <= 1 s. The figures go to ``--json`` (atomically)
and, last, to stdout as one JSON line.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from brainvq.io import write_report  # noqa: E402
from load_test import (Server, check_reconstruction, generate, generate_arguments, open_client,  # noqa: E402
                       sample_keys)

GOALS = {"cold_start_s": 15.0, "reconstruct_s": 0.5, "first_frame_s": 1.0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints",
                   help="bundle folder with vqvae/ and pixelcnn/ (default: the shipped checkpoints/)")
    p.add_argument("--data-dir", default=None, help="data root for the Browse tab (default: the bundled samples)")
    p.add_argument("--starts", type=int, default=1, help="cold starts to time (median)")
    p.add_argument("--runs", type=int, default=10, help="timed reconstructions (median)")
    p.add_argument("--generations", type=int, default=3, help="timed generations (median of first frames)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--fresh-tls", action="store_true",
                   help="let each request build its own TLS context, gradio_client's default (adds its client CPU)")
    p.add_argument("--json", help="where to write the figures")
    args = p.parse_args(argv)
    if args.generations and not (args.checkpoints / "pixelcnn").is_dir():
        p.error(f"{args.checkpoints / 'pixelcnn'} does not exist: generation needs a prior (or --generations 0)")

    keys = sample_keys(args.data_dir)
    starts, problems, recon, firsts, totals = [], [], [], [], []
    for attempt in range(args.starts):
        server = Server(args.checkpoints, args.data_dir)
        try:
            starts.append(server.wait_ready(args.timeout))
            print(f"cold start {attempt + 1}: {starts[-1]:.2f} s", file=sys.stderr)
            if attempt < args.starts - 1:
                continue
            client = open_client(server.url, None if args.fresh_tls else httpx.create_ssl_context())
            problems.append(check_reconstruction(client.predict(keys[0], api_name="/reconstruct_sample")))  # warm-up
            recon = []
            for i in range(args.runs):
                began = time.perf_counter()
                answer = client.predict(keys[(i + 1) % len(keys)], api_name="/reconstruct_sample")
                recon.append(time.perf_counter() - began)
                problems.append(check_reconstruction(answer))
            print(f"reconstruction: median {statistics.median(recon):.3f} s of {len(recon)}", file=sys.stderr)
            firsts, totals = [], []
            for i in range(args.generations):
                first, _, total, problem = generate(client, generate_arguments(client, 1, i), args.timeout)
                first = total if first is None else first  # nothing streamed before the end: the problem says so
                firsts.append(first)
                totals.append(total)
                problems.append(problem)
                print(f"generation {i + 1}: first frame {first:.3f} s, done {total:.2f} s", file=sys.stderr)
        finally:
            server.stop()

    def median(values: list[float]) -> float | None:
        return round(statistics.median(values), 3) if values else None

    result = {
        "checkpoints": str(args.checkpoints), "cpu_cores": os.cpu_count(),
        "client_tls": "per request" if args.fresh_tls else "shared",
        "cold_start_s": median(starts), "cold_starts_s": [round(s, 2) for s in starts],
        "reconstruct_s": median(recon), "reconstruct_runs_s": [round(s, 3) for s in recon],
        "first_frame_s": median(firsts), "first_frames_s": [round(s, 3) for s in firsts],
        "generate_total_s": median(totals), "generate_totals_s": [round(s, 2) for s in totals],
        "goals": GOALS,
        "problems": [problem for problem in problems if problem],
    }
    for name, goal in GOALS.items():
        result[f"meets_{name}"] = result[name] is not None and result[name] <= goal
    result["meets_goals"] = all(result[f"meets_{name}"] for name in GOALS) and not result["problems"]
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

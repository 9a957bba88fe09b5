"""Load test of the demo: 16 concurrent gradio_client users on loopback for a bounded time.

    python bench/load_test.py --json bench/results/load.json             # shipped weights, 60 s
    python bench/load_test.py --checkpoints DIR --seconds 10              # any bundle folder (vqvae/ + pixelcnn/)

Starts ``python app.py --offline`` on 127.0.0.1 as a subprocess (so its memory is measured alone), waits until it
serves, warms it up with one reconstruction and one generation, then runs ``--clients`` threads, each with its
own gradio_client.Client, for ``--seconds``. Each user sends requests back to back: every ``--generate-every``-th
one is a generation of n=1 (the heavy, CPU-bound request), the others reconstruct a sample slice. Every answer is
checked (an SSIM in (0, 1] and a reconstruction image; a finished generation with one decoded image). Requests
still running at the deadline are waited for and counted.

Reports per-kind latency percentiles (p50/p90/p99/max, nearest rank), requests done, errors (with examples),
throughput, and the server's resident memory (VmRSS) idle, after warm-up, at the end and its peak (VmHWM, and the
highest 0.25 s sample), from /proc (psutil is used when installed). Clients and server share the machine's cores.
The figures go to ``--json`` (atomically) and, last, to stdout as one JSON line.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brainvq.io import write_report  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SSIM = re.compile(r"SSIM (-?[0-9.]+)")


# ----------------------------------------------------------------------------- the server process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python app.py --offline`` on 127.0.0.1 in its own process, with a private Gradio temp folder and log."""

    def __init__(self, checkpoints: Path, data_dir: str | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.workdir = Path(tempfile.mkdtemp(prefix="brainvq-bench-"))
        self.log_path = self.workdir / "server.log"
        command = [sys.executable, str(ROOT / "app.py"), "--offline", "--host", "127.0.0.1", "--port", str(self.port),
                   "--checkpoints", str(checkpoints)]
        if data_dir:
            command += ["--data-dir", str(data_dir)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "GRADIO_TEMP_DIR": str(self.workdir / "gradio"), "PYTHONUNBUFFERED": "1"}
        self.log = open(self.log_path, "wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds from the spawn until GET / answers 200."""
        deadline = self.started + timeout
        with httpx.Client(timeout=2.0) as http:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if http.get(self.url).status_code == 200:
                        return time.perf_counter() - self.started
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    def memory_mb(self) -> dict[str, float]:
        """Resident set now (VmRSS; psutil's rss when installed) and its peak so far (VmHWM), in MiB."""
        status = _proc_status(self.proc.pid)
        rss, peak = status.get("VmRSS", float("nan")), status.get("VmHWM", float("nan"))
        try:
            import psutil  # optional

            rss = psutil.Process(self.proc.pid).memory_info().rss / 2**20
            peak = peak if peak == peak else rss  # no /proc (not Linux): the peak is only what is sampled
        except Exception:  # noqa: BLE001 - not installed, or the process is gone
            pass
        return {"rss": rss, "hwm": peak}

    def disk_mb(self) -> float:
        """What the server has written to its Gradio temp folder (uploads, served images)."""
        total = sum(p.stat().st_size for p in (self.workdir / "gradio").rglob("*") if p.is_file())
        return total / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _proc_status(pid: int) -> dict[str, float]:
    """VmRSS / VmHWM / ... of a process from /proc/PID/status, in MiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def sample_keys(data_dir: str | None) -> list[str]:
    """The slice keys the server's Browse tab offers (its data folder's test split, else the bundled samples)."""
    if data_dir:
        from brainvq import data

        try:
            root = data.resolve_data_dir(data_dir)
            return [item.path for item in data.list_partition(root, data.detect_layout(root), "test")]
        except data.DataError:
            pass  # the server falls back to the bundled samples too
    samples = ROOT / "assets" / "samples"
    return sorted(p.name for p in samples.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


# ----------------------------------------------------------------------------- requests and checks


def check_reconstruction(result) -> str | None:
    """None when the answer is right, else what is wrong with it."""
    if not isinstance(result, (list, tuple)) or len(result) != 5:
        return f"unexpected answer {str(result)[:200]}"
    original, grid, recon, metrics, notes = result
    match = SSIM.search(metrics or "")
    if match is None:
        return f"no SSIM in the answer: {str(notes)[:200]}"
    if not 0.0 < float(match.group(1)) <= 1.0:
        return f"SSIM {match.group(1)} is not in (0, 1]"
    if recon is None or original is None or grid is None:
        return "an image is missing"
    return None


def check_generation(result) -> str | None:
    if not isinstance(result, (list, tuple)) or len(result) != 3:
        return f"unexpected answer {str(result)[:200]}"
    grid, images, status = result
    if not str(status).startswith("Done: 1 sample(s)"):
        return f"not done: {str(status)[:200]}"
    if grid is None or not images or len(images) != 1 or not images[0].get("image"):
        return "the generated image is missing"
    return None


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """Nearest-rank p50/p90/p99, max and mean, in seconds (None when there is nothing to summarise)."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"n": len(ordered), "p50": round(rank(50), 3), "p90": round(rank(90), 3), "p99": round(rank(99), 3),
            "max": round(ordered[-1], 3), "mean": round(sum(ordered) / len(ordered), 3)}


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {"reconstruct": [], "generate": []}
        self.errors: dict[str, int] = {"reconstruct": 0, "generate": 0}
        self.examples: list[str] = []

    def add(self, kind: str, seconds: float, problem: str | None) -> None:
        with self.lock:
            if problem is None:
                self.latencies[kind].append(seconds)
            else:
                self.errors[kind] += 1
                if len(self.examples) < 10:
                    self.examples.append(f"{kind}: {problem}")


def call(client, kind: str, key: str, seed: int, timeout: float):
    if kind == "generate":
        return client.submit(1, 1.0, 0, seed, api_name="/generate").result(timeout=timeout)
    return client.submit(key, api_name="/reconstruct_sample").result(timeout=timeout)


def user(index: int, client, keys: list[str], deadline: float, every: int, timeout: float, recorder: Recorder,
         start: threading.Barrier) -> None:
    start.wait()
    step = 0
    while time.perf_counter() < deadline:
        kind = "generate" if every and (index + step) % every == every - 1 else "reconstruct"
        key = keys[(index * 7 + step) % len(keys)]
        began = time.perf_counter()
        try:
            result = call(client, kind, key, seed=index * 100_000 + step, timeout=timeout)
            problem = (check_generation if kind == "generate" else check_reconstruction)(result)
        except Exception as error:  # noqa: BLE001 - every failure is counted, with its message
            problem = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
        recorder.add(kind, time.perf_counter() - began, problem)
        step += 1


def monitor(server: Server, stop: threading.Event, samples: list[float]) -> None:
    while not stop.is_set():
        samples.append(server.memory_mb()["rss"])
        stop.wait(0.25)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints",
                   help="bundle folder with vqvae/ and pixelcnn/ (default: the shipped checkpoints/)")
    p.add_argument("--data-dir", default=None, help="data root for the Browse tab (default: the bundled samples)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0, help="how long new requests are sent")
    p.add_argument("--generate-every", type=int, default=4, help="every N-th request of a user generates (0: never)")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--json", help="where to write the figures")
    args = p.parse_args(argv)
    if args.generate_every and not (args.checkpoints / "pixelcnn").is_dir():
        p.error(f"{args.checkpoints / 'pixelcnn'} does not exist: generation needs a prior (or --generate-every 0)")

    from gradio_client import Client

    keys = sample_keys(args.data_dir)
    server = Server(args.checkpoints, args.data_dir, args.port)
    try:
        startup_s = server.wait_ready()
        idle = server.memory_mb()["rss"]
        print(f"server up in {startup_s:.1f} s at {server.url} ({idle:.0f} MiB); {len(keys)} sample slices",
              file=sys.stderr)
        warm_client = Client(server.url, verbose=False, download_files=False)
        began = time.perf_counter()
        warm_problems = [check_reconstruction(call(warm_client, "reconstruct", keys[0], 0, args.request_timeout))]
        if args.generate_every:
            warm_problems.append(check_generation(call(warm_client, "generate", keys[0], 0, args.request_timeout)))
        warmup_s = time.perf_counter() - began
        if any(warm_problems):
            raise RuntimeError(f"the warm-up answers are wrong: {warm_problems}\n{server.log_tail()}")
        warm = server.memory_mb()["rss"]

        clients: list = [None] * args.clients

        def connect(i: int) -> None:
            clients[i] = Client(server.url, verbose=False, download_files=False)

        threads = [threading.Thread(target=connect, args=(i,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(f"{args.clients} clients connected; running for {args.seconds:g} s", file=sys.stderr)

        recorder, rss_samples, stop = Recorder(), [], threading.Event()
        watcher = threading.Thread(target=monitor, args=(server, stop, rss_samples), daemon=True)
        watcher.start()
        start = threading.Barrier(args.clients + 1)
        users = []
        began = time.perf_counter()
        deadline = began + args.seconds
        for i, client in enumerate(clients):
            users.append(threading.Thread(target=user, args=(i, client, keys, deadline, args.generate_every,
                                                             args.request_timeout, recorder, start), daemon=True))
            users[-1].start()
        start.wait()
        for thread in users:
            thread.join(timeout=args.seconds + args.request_timeout + 60)
        duration = time.perf_counter() - began
        stop.set()
        watcher.join()
        alive = server.proc.poll() is None
        memory = server.memory_mb() if alive else {"rss": float("nan"), "hwm": float("nan")}
        disk = server.disk_mb()
        still_running = sum(thread.is_alive() for thread in users)
    finally:
        server.stop()

    done = {kind: len(values) for kind, values in recorder.latencies.items()}
    errors = sum(recorder.errors.values())
    total = sum(done.values()) + errors
    result = {
        "clients": args.clients, "seconds": args.seconds, "duration_s": round(duration, 1),
        "generate_every": args.generate_every, "checkpoints": str(args.checkpoints), "cpu_cores": os.cpu_count(),
        "startup_s": round(startup_s, 2), "warmup_s": round(warmup_s, 2),
        "requests": {"total": total, **{kind: done[kind] + recorder.errors[kind] for kind in done}},
        "answered_correctly": done, "errors": errors, "error_examples": recorder.examples,
        "users_still_waiting": still_running, "server_alive_after": alive,
        "throughput_rps": round(sum(done.values()) / duration, 2) if duration else None,
        "latency_s": {kind: percentiles(values) for kind, values in recorder.latencies.items()},
        "server_rss_mb": {"idle": round(idle, 1), "after_warmup": round(warm, 1), "after": round(memory["rss"], 1),
                          "peak_sampled": round(max(rss_samples, default=warm), 1), "peak_vmhwm": round(memory["hwm"], 1),
                          "growth_during_load": round(memory["rss"] - warm, 1)},
        "server_temp_files_mb": round(disk, 1),
    }
    result["all_correct"] = bool(total and errors == 0 and alive and still_running == 0)
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

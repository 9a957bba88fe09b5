"""Load test of the demo: U users press Generate at the same moment while others reconstruct, on loopback.

    python bench/load_test.py --json bench/results/load.json               # 16 users x 4 samples, shipped weights
    python bench/load_test.py --users 1 --rounds 5 --reconstructors 0      # one user alone
    python bench/load_test.py --app DIR                                    # the app.py of another checkout
    python bench/load_test.py --random-prior 64,64,12,32                   # an untrained prior of another shape

Starts ``python app.py --offline`` (default settings) on 127.0.0.1 as a subprocess, so its memory is measured
alone, waits until it serves and warms it up with one reconstruction and one generation, and opens a session for
each client (one /model_info call, like a browser loading the page). Then ``--rounds`` times:
``--users`` threads, each with its own gradio_client.Client, submit /generate (``--samples`` samples, temperature
1, top-k and top-p off, a seed of their own) at the same moment, while ``--reconstructors`` other clients each
send a /reconstruct_sample request every ``--reconstruct-every`` seconds (or as soon as the previous one is
answered, if later) until every generation of the round has finished. Every answer is
checked (a finished generation with its decoded images; an SSIM in (0, 1] and the images of a reconstruction).

Reports, over every round's answers together (nearest-rank percentiles), and each round's p95 with their median
over rounds: the time from submit to the first streamed frame (a
partly filled grid, possibly still empty), to the first frame with sampled codes and to the finished samples,
the reconstruction latency while generations ran, errors (with examples), and the server's resident memory
(VmRSS) idle, after warm-up, at the end and its peak (VmHWM, and the highest 0.25 s sample), from /proc (psutil
is used when installed), summed over the server and its sampler process; CPU time likewise. Clients and server
share the machine's cores; the clients stand in for browsers on other machines, so they share one TLS context
instead of building one per request as gradio_client does by default (it loads the CA certificates), which
with 16 users pressing at once takes the cores from the server; ``--fresh-tls`` restores gradio_client's
default. A goal with nothing measured (no reconstructions) meets as null. The figures go to ``--json``
(atomically) and, last, to stdout as one JSON line.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import socket
import ssl
import statistics
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
POSITIONS = re.compile(r"Sampling codes\S* [1-9][0-9,]*( of|/)")  # a frame with codes sampled (this app, the old)


# ----------------------------------------------------------------------------- the server process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python app.py --offline`` on 127.0.0.1 in its own process, with a private Gradio temp folder and log."""

    def __init__(self, checkpoints: Path, data_dir: str | None = None, port: int | None = None, app: Path = ROOT):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.workdir = Path(tempfile.mkdtemp(prefix="brainvq-bench-"))
        self.log_path = self.workdir / "server.log"
        command = [sys.executable, str(Path(app) / "app.py"), "--offline", "--host", "127.0.0.1", "--port", str(self.port),
                   "--checkpoints", str(checkpoints)]
        if data_dir:
            command += ["--data-dir", str(data_dir)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "GRADIO_TEMP_DIR": str(self.workdir / "gradio"), "PYTHONUNBUFFERED": "1"}
        self.log = open(self.log_path, "wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(command, cwd=app, env=env, stdout=self.log, stderr=subprocess.STDOUT)

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

    def pids(self) -> list[int]:
        """The server and its child processes (the sampler process), from /proc."""
        pids = [self.proc.pid]
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            try:
                pids += map(int, task.read_text().split())
            except OSError:
                pass
        return pids

    def memory_mb(self) -> dict[str, float]:
        """Resident set now (VmRSS; psutil's rss when installed) and its peak so far (VmHWM), in MiB, summed over
        the server and its children (the sum of peaks bounds the peak of the sum)."""
        statuses = [_proc_status(pid) for pid in self.pids()]
        rss = sum(s.get("VmRSS", float("nan")) for s in statuses)
        peak = sum(s.get("VmHWM", float("nan")) for s in statuses)
        try:
            import psutil  # optional

            server = psutil.Process(self.proc.pid)
            rss = sum(p.memory_info().rss for p in [server, *server.children()]) / 2**20
            peak = peak if peak == peak else rss  # no /proc (not Linux): the peak is only what is sampled
        except Exception:  # noqa: BLE001 - not installed, or the process is gone
            pass
        return {"rss": rss, "hwm": peak}

    def cpu_s(self) -> float:
        """CPU seconds the server and its children have used (user + system, all threads), from /proc."""
        try:
            fields = [Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split() for pid in self.pids()]
            return sum(int(f[11]) + int(f[12]) for f in fields) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

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


def random_bundle(checkpoints: Path, shape: str) -> Path:
    """A temporary bundle: the VQ-VAE of ``checkpoints`` and a random prior of ``shape`` (see bench/sampling.py)."""
    from brainvq.vqvae import VQVAE
    from sampling import random_prior

    folder = Path(tempfile.mkdtemp(prefix="brainvq-random-prior-"))
    shutil.copytree(checkpoints / "vqvae", folder / "vqvae")
    vqvae = VQVAE.load(folder / "vqvae")
    random_prior(vqvae, shape).save(folder / "pixelcnn", vqvae.fingerprint(), random_prior=shape)
    return folder


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


def check_generation(result, samples: int = 1) -> str | None:
    if not isinstance(result, (list, tuple)) or len(result) != 3:
        return f"unexpected answer {str(result)[:200]}"
    grid, images, status = result
    if not str(status).startswith(f"Done: {samples} sample(s)"):
        return f"not done: {str(status)[:200]}"
    if grid is None or not images or len(images) != samples or not all(image.get("image") for image in images):
        return "a generated image is missing"
    return None


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """Nearest-rank p50/p95/p99, max and mean, in seconds (None when there is nothing to summarise)."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"n": len(ordered), "p50": round(rank(50), 3), "p95": round(rank(95), 3), "p99": round(rank(99), 3),
            "max": round(ordered[-1], 3), "mean": round(sum(ordered) / len(ordered), 3)}


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {"first_frame": [], "first_codes": [], "generate": [],
                                                  "reconstruct": []}
        self.errors: dict[str, int] = {"generate": 0, "reconstruct": 0}
        self.examples: list[str] = []

    def add(self, kind: str, seconds: float, problem: str | None) -> None:
        with self.lock:
            if problem is None:
                self.latencies[kind].append(seconds)
            else:
                self.errors[kind] += 1
                if len(self.examples) < 10:
                    self.examples.append(f"{kind}: {problem}")


def open_client(url: str, tls: ssl.SSLContext | None):
    """A gradio_client.Client that uses the SSL context ``tls`` for every request (None: gradio_client's default,
    where each request builds its own, loading the CA certificates: ~33 ms of client CPU). gradio_client passes
    ``ssl_verify`` to httpx as ``verify``, which takes a ready context."""
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False, **({} if tls is None else {"ssl_verify": tls}))


def generate_arguments(client, samples: int, seed: int) -> tuple:
    """/generate's inputs: (n, temperature, top-k, top-p, seed), or without top-p for an app that has none."""
    inputs = len(client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"])
    return (samples, 1.0, 0, 1.0, seed) if inputs == 5 else (samples, 1.0, 0, seed)


def generate(client, arguments: tuple, timeout: float) -> tuple[float | None, float | None, float, str | None]:
    """Seconds to the first streamed frame, to the first frame with sampled codes, to the end; problem or None."""
    began = time.perf_counter()
    job = client.submit(*arguments, api_name="/generate")
    first = first_codes = None
    deadline = began + timeout
    while first_codes is None and not job.done() and time.perf_counter() < deadline:
        outputs = job.outputs()
        if outputs and first is None:
            first = time.perf_counter() - began
            if "Sampling codes" not in str(outputs[0][2]):
                return first, None, first, f"the first output is not a partial grid: {str(outputs[0][2])[:200]}"
        if any(POSITIONS.search(str(output[2])) for output in outputs):
            first_codes = time.perf_counter() - began
        time.sleep(0.02)
    try:
        result = job.result(timeout=max(1.0, deadline - time.perf_counter()))
    except Exception as error:  # noqa: BLE001 - every failure is counted, with its message
        return first, first_codes, time.perf_counter() - began, f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
    total = time.perf_counter() - began
    if first is None:
        return None, None, total, "no partly filled grid was streamed before the end"
    return first, first_codes, total, check_generation(result, arguments[0])


def generator_user(client, arguments: tuple, timeout: float, recorder: Recorder, start: threading.Barrier) -> None:
    start.wait()
    first, first_codes, total, problem = generate(client, arguments, timeout)
    recorder.add("generate", total, problem)
    if problem is None:
        recorder.add("first_frame", first, None)
        if first_codes is not None:  # None: the run ended before such a frame was seen
            recorder.add("first_codes", first_codes, None)


def reconstructor(client, keys: list[str], index: int, every: float, done: threading.Event, timeout: float,
                  recorder: Recorder, start: threading.Barrier) -> None:
    start.wait()
    step = 0
    while not done.is_set():
        began = time.perf_counter()
        try:
            result = client.submit(keys[(index * 7 + step) % len(keys)], api_name="/reconstruct_sample").result(
                timeout=timeout)
            problem = check_reconstruction(result)
        except Exception as error:  # noqa: BLE001
            problem = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
        if not done.is_set():  # only requests answered while generations ran
            recorder.add("reconstruct", time.perf_counter() - began, problem)
        step += 1
        done.wait(max(0.0, began + every - time.perf_counter()))


def monitor(server: Server, stop: threading.Event, samples: list[float]) -> None:
    while not stop.is_set():
        samples.append(server.memory_mb()["rss"])
        stop.wait(0.25)


# ----------------------------------------------------------------------------- main

GOALS = {"first_frame_p95_s": 2.0, "generate_p95_s": 20.0, "errors": 0, "reconstruct_p95_s": 1.5}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints",
                   help="bundle folder with vqvae/ and pixelcnn/ (default: the shipped checkpoints/)")
    p.add_argument("--app", type=Path, default=ROOT, help="the checkout whose app.py is served (default: this one)")
    p.add_argument("--random-prior", help="CHANNELS,EMBED,LAYERS,MAX_DILATION: serve the VQ-VAE of --checkpoints with "
                                          "a randomly initialised prior of this shape (seed 0), to time it untrained")
    p.add_argument("--data-dir", default=None, help="data root for the Browse tab (default: the bundled samples)")
    p.add_argument("--users", type=int, default=16, help="users pressing Generate at the same moment")
    p.add_argument("--samples", type=int, default=4, help="samples each user asks for")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reconstructors", type=int, default=2, help="clients reconstructing meanwhile")
    p.add_argument("--reconstruct-every", type=float, default=1.0,
                   help="seconds from one reconstruction of a client to its next (0: back to back)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--fresh-tls", action="store_true",
                   help="let each client request build its own TLS context, as gradio_client does by default "
                        "(the load test's own clients then take far more of the cores the server runs on)")
    p.add_argument("--json", help="where to write the figures")
    args = p.parse_args(argv)
    if not args.random_prior and not (args.checkpoints / "pixelcnn").is_dir():
        p.error(f"{args.checkpoints / 'pixelcnn'} does not exist: generation needs a prior")

    keys = sample_keys(args.data_dir)
    checkpoints = random_bundle(args.checkpoints, args.random_prior) if args.random_prior else args.checkpoints
    server = Server(checkpoints, args.data_dir, args.port, app=args.app)
    recorder, rss_samples, stop = Recorder(), [], threading.Event()
    try:
        startup_s = server.wait_ready()
        idle = server.memory_mb()["rss"]
        print(f"server up in {startup_s:.1f} s at {server.url} ({idle:.0f} MiB); {len(keys)} sample slices",
              file=sys.stderr)
        tls = None if args.fresh_tls else httpx.create_ssl_context()
        warm_client = open_client(server.url, tls)
        warm_problems = [check_reconstruction(warm_client.predict(keys[0], api_name="/reconstruct_sample")),
                         generate(warm_client, generate_arguments(warm_client, args.samples, 0),
                                  args.request_timeout)[3]]
        if any(warm_problems):
            raise RuntimeError(f"the warm-up answers are wrong: {warm_problems}\n{server.log_tail()}")
        warm = server.memory_mb()["rss"]
        clients = [open_client(server.url, tls) for _ in range(args.users + args.reconstructors)]
        for client in clients:  # each user has the page open (a session) before pressing a button
            client.predict(api_name="/model_info")
        watcher = threading.Thread(target=monitor, args=(server, stop, rss_samples), daemon=True)
        watcher.start()
        load_before = [round(x, 2) for x in os.getloadavg()]  # the machine's other work (1, 5, 15 min)
        began, server_cpu, client_cpu = time.perf_counter(), server.cpu_s(), sum(os.times()[:2])
        marks = [{kind: 0 for kind in recorder.latencies}]   # answers recorded before each round and after the last
        for round_ in range(args.rounds):
            start, done = threading.Barrier(args.users + args.reconstructors + 1), threading.Event()
            users = [threading.Thread(target=generator_user, daemon=True, args=(
                client, generate_arguments(client, args.samples, 1000 * round_ + i + 1), args.request_timeout,
                recorder, start)) for i, client in enumerate(clients[:args.users])]
            others = [threading.Thread(target=reconstructor, daemon=True, args=(
                client, keys, i, args.reconstruct_every, done, args.request_timeout, recorder, start))
                for i, client in enumerate(clients[args.users:])]
            for thread in users + others:
                thread.start()
            start.wait()
            for thread in users:
                thread.join(args.request_timeout + 60)
            done.set()
            for thread in others:
                thread.join(args.request_timeout + 60)
            marks.append({kind: len(values) for kind, values in recorder.latencies.items()})
            done = len(recorder.latencies["generate"])
            print(f"round {round_ + 1}: {done} generations done so far, {sum(recorder.errors.values())} errors",
                  file=sys.stderr)
        duration = time.perf_counter() - began
        server_cpu, client_cpu = server.cpu_s() - server_cpu, sum(os.times()[:2]) - client_cpu
        stop.set()
        watcher.join()
        alive = server.proc.poll() is None
        memory = server.memory_mb() if alive else {"rss": float("nan"), "hwm": float("nan")}
        disk = server.disk_mb()
    finally:
        stop.set()
        server.stop()
        if checkpoints != args.checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)

    errors = sum(recorder.errors.values())
    latency = {kind: percentiles(values) for kind, values in recorder.latencies.items()}
    per_round = {kind: [percentiles(values[a[kind]:b[kind]])["p95"] for a, b in zip(marks, marks[1:])]
                 for kind, values in recorder.latencies.items()}
    median_p95 = {kind: statistics.median(p95s) if None not in p95s else None for kind, p95s in per_round.items()}
    result = {
        "users": args.users, "samples_per_user": args.samples, "rounds": args.rounds,
        "reconstructors": args.reconstructors, "reconstruct_every_s": args.reconstruct_every,
        "checkpoints": str(args.checkpoints), "random_prior": args.random_prior, "app": str(args.app),
        "client_tls": "per request" if args.fresh_tls else "shared",
        "cpu_cores": os.cpu_count(), "startup_s": round(startup_s, 2), "duration_s": round(duration, 1),
        "cpu_s": {"server": round(server_cpu, 1), "clients": round(client_cpu, 1)},
        "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "latency_s": latency, "p95_per_round_s": per_round, "median_of_round_p95_s": median_p95, "errors": errors, "errors_by_kind": recorder.errors,
        "error_examples": recorder.examples, "server_alive_after": alive,
        "server_rss_mb": {"idle": round(idle, 1), "after_warmup": round(warm, 1), "after": round(memory["rss"], 1),
                          "peak_sampled": round(max(rss_samples, default=warm), 1),
                          "peak_vmhwm": round(memory["hwm"], 1)},
        "server_temp_files_mb": round(disk, 1), "goals": GOALS,
    }
    measured = {"first_frame_p95_s": latency["first_frame"]["p95"], "generate_p95_s": latency["generate"]["p95"],
                "errors": errors, "reconstruct_p95_s": latency["reconstruct"]["p95"]}
    result["meets"] = {name: None if measured[name] is None else measured[name] <= goal
                       for name, goal in GOALS.items()}
    return write_report(result, args.json)


if __name__ == "__main__":
    main()

"""The demo's batched sampler in a process of its own, so that the app's other threads cannot slow it down.

The sampler steps a Python loop of small tensor operations, each of which hands Python's GIL back and forth:
in the app's process every thread running Python (Gradio, image encoding, reconstructions) makes each step
wait for the GIL (one busy Python thread slows a 2.3 ms step of 64 grids to 1.7 s; bench/demo_costs.py).
So one child process, ``python -m brainvq.sampler_process``, holds a ``BatchSampler`` per prior and steps
them, and the app sends it priors (config and safetensors bytes) and requests and gets back each request's
codes a row at a time.

Messages, app -> sampler: ("prior", key, config, weights), ("forget", key), ("add", id, key, n, temperature,
top_k, top_p, seed), ("cancel", id). Sampler -> app, each with the positions sampled so far: ("started",
positions, ids), ("rows", positions, [(id, row, codes)]), ("stopped", positions, id, filled, row, codes),
("failed", positions, ids, reason). The child ends when the app closes its pipe (or exits).
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import traceback
import weakref
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch

from brainvq.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.sampling import BatchSampler, Request

PACKAGE_ROOT = Path(__file__).resolve().parents[1]   # the child imports brainvq from here


class SamplerProcess:
    """The app's handle on the sampler process: ``add`` and ``cancel`` requests. A listener thread per child
    hands the child's messages to ``on_message`` and, once the child has ended, calls ``on_exit(exit code,
    child)``, ``child`` being the number ``add`` returned with the ids it sent there. A request after the child
    ended starts a new one."""

    def __init__(self, on_message: Callable[[tuple], None], on_exit: Callable[[int, int], None], threads: int = 1,
                 max_grids: int | None = None):
        self.on_message, self.on_exit, self.threads, self.max_grids = on_message, on_exit, threads, max_grids
        self.proc: subprocess.Popen | None = None
        self.child = 0                                 # how many children have been started
        self._outbox: Connection | None = None
        self._keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # prior -> key, in this child
        self._forgotten: list[tuple[int, int]] = []    # (child, key) of priors gone since the last message
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the child unless it runs (it takes a second or two to import torch)."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        to_child, from_app = Pipe(duplex=False)    # (reader, writer)
        from_child, to_app = Pipe(duplex=False)
        path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "brainvq.sampler_process", str(to_child.fileno()), str(to_app.fileno()),
             str(self.threads), str(self.max_grids or 0)],
            pass_fds=(to_child.fileno(), to_app.fileno()), env={**os.environ, "PYTHONPATH": path})
        to_child.close()
        to_app.close()
        self.child += 1
        self._outbox, self._keys = from_app, weakref.WeakKeyDictionary()
        threading.Thread(target=self._listen, args=(from_child, self.proc, self.child),
                         name="brainvq-sampler-listener", daemon=True).start()

    def _listen(self, inbox: Connection, proc: subprocess.Popen, child: int) -> None:
        try:
            while True:
                self.on_message(inbox.recv())
        except (EOFError, OSError):
            pass
        inbox.close()
        self.on_exit(proc.wait(), child)

    def add(self, prior: GatedPixelCNN, n: int, temperature: float, top_k: int | None, top_p: float | None,
            seed: int) -> tuple[int, int]:
        """Queue a request, starting a child if none runs; returns (child, id), the id being what every message
        about the request carries."""
        with self._lock:
            self._start()
            ident = next(self._ids)
            self._send(("add", ident, self._key(prior), n, temperature, top_k, top_p, seed))
            return self.child, ident

    def _key(self, prior: GatedPixelCNN) -> int:
        """The child's key for ``prior``, sending it the prior the first time."""
        key = self._keys.get(prior)
        if key is None:
            key = self._keys[prior] = next(self._ids)
            weights = safetensors.torch.save({name: t.contiguous() for name, t in prior.state_dict().items()})
            self._send(("prior", key, prior.checkpoint_config(), weights))
            weakref.finalize(prior, self._forgotten.append, (self.child, key))   # told with the next message
        return key

    def cancel(self, ident: int) -> None:
        """Stop a request; the child answers with its "stopped" message (or none if it already finished)."""
        with self._lock:
            self._send(("cancel", ident))

    def _send(self, message: tuple) -> None:
        """To the running child (under the lock), after telling it of the priors it may let go."""
        if self._outbox is None:
            return
        try:
            while self._forgotten:   # appended to by finalizers, from any thread
                child, key = self._forgotten.pop()
                if child == self.child:
                    self._outbox.send(("forget", key))
            self._outbox.send(message)
        except (OSError, ValueError):   # the child has ended: its listener reports it
            pass

    def close(self, timeout: float = 10.0) -> None:
        """End the child: it stops when its pipe closes (its requests end through ``on_exit``)."""
        with self._lock:
            outbox, proc, self._outbox = self._outbox, self.proc, None
        if outbox is not None:
            outbox.close()
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()


# ----------------------------------------------------------------------------- the child


class SamplerServer:
    """The child's side: one ``BatchSampler`` per prior, stepped in turn while any has work."""

    def __init__(self, inbox: Connection, outbox: Connection, max_grids: int | None):
        self.inbox, self.outbox, self.max_grids = inbox, outbox, max_grids
        self.priors: dict[int, GatedPixelCNN | str] = {}     # key -> prior, or why it could not be built
        self.forgotten: set[int] = set()
        self.samplers: dict[int, BatchSampler] = {}
        self.requests: dict[int, tuple[int, Request]] = {}   # id -> (prior key, request)
        self.announced: set[int] = set()                     # ids whose start was reported
        self.positions = 0

    def serve(self) -> None:
        try:
            while True:
                self.read(block=not any(s.busy for s in self.samplers.values()))
                for key, sampler in list(self.samplers.items()):
                    if sampler.busy:
                        self.step(key, sampler)
                for key in [k for k in self.forgotten if not (k in self.samplers and self.samplers[k].busy)]:
                    self.forgotten.discard(key)
                    self.priors.pop(key, None)
                    self.samplers.pop(key, None)
        except (EOFError, OSError):   # the app closed its pipe or exited
            return

    def read(self, block: bool) -> None:
        """Handle every waiting message; wait for one first when ``block``."""
        while block or self.inbox.poll():
            block = False
            kind, *args = self.inbox.recv()
            if kind == "prior":
                self.priors[args[0]] = self.build(*args[1:])
            elif kind == "forget":
                self.forgotten.add(args[0])
            elif kind == "add":
                self.add(*args)
            elif kind == "cancel" and args[0] in self.requests:
                key, request = self.requests[args[0]]
                self.samplers[key].cancel(request)

    @staticmethod
    def build(config: dict, weights: bytes) -> GatedPixelCNN | str:
        try:
            prior = GatedPixelCNN(PixelCNNConfig.from_dict(config["arch"]))
            prior.load_state_dict(safetensors.torch.load(weights))
        except Exception as error:  # noqa: BLE001 - its requests fail with the reason
            return f"the prior could not be set up ({type(error).__name__}: {error})"
        prior.meta = config
        return prior.eval()

    def add(self, ident: int, key: int, n: int, temperature: float, top_k: int | None, top_p: float | None,
            seed: int) -> None:
        prior = self.priors[key]
        if isinstance(prior, str):
            return self.send("failed", [ident], prior)
        sampler = self.samplers.get(key)
        if sampler is None:
            sampler = self.samplers[key] = BatchSampler(prior, max_grids=self.max_grids)
        self.requests[ident] = key, sampler.add(n, temperature, top_k, top_p, seed)

    def step(self, key: int, sampler: BatchSampler) -> None:
        """One step of ``sampler``; report requests that started, finished a row, stopped or failed."""
        mine = [(ident, request) for ident, (k, request) in self.requests.items() if k == key]
        try:
            advanced = sampler.step()
        except Exception as error:  # noqa: BLE001 - end this prior's requests with the reason, keep serving
            traceback.print_exc()
            self.samplers.pop(key)
            for ident, _ in mine:
                self.forget(ident)
            return self.send("failed", [ident for ident, _ in mine], f"{type(error).__name__}: {error}")
        self.positions += sum(r.n for r in advanced)
        started = [ident for ident, r in mine if r.started and ident not in self.announced]
        if started:
            self.announced.update(started)
            self.send("started", started)
        if advanced and sampler.column == 0:   # a row finished: its codes are in the requests
            rows = []
            for ident, request in mine:
                if request in advanced:
                    row = (request.filled - 1) // request.size
                    rows.append((ident, row, request.codes[:, row].numpy()))
                    if request.done:
                        self.forget(ident)
            self.send("rows", rows)
        for ident, request in mine:   # stopped: dropped by this step, or cancelled before it started
            if request.cancelled and ident in self.requests and request not in sampler.active:
                self.forget(ident)
                row = min(request.row, request.size - 1)
                self.send("stopped", ident, request.filled, row, request.codes[:, row].numpy())

    def forget(self, ident: int) -> None:
        self.requests.pop(ident)
        self.announced.discard(ident)

    def send(self, kind: str, *args) -> None:
        self.outbox.send((kind, self.positions, *args))


def main(argv: list[str]) -> None:
    inbox_fd, outbox_fd, threads, max_grids = map(int, argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the app's to handle; the pipe closing ends this
    torch.set_num_threads(threads)
    server = SamplerServer(Connection(inbox_fd, writable=False), Connection(outbox_fd, readable=False),
                           max_grids or None)
    with torch.inference_mode():
        server.serve()


if __name__ == "__main__":
    main(sys.argv[1:])

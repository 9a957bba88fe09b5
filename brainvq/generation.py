"""What the Generate tab runs: one sampling loop shared by every user, and the live view of grids filling in.

Every Generate request joins the batched sampler of its prior (``brainvq.sampling.BatchSampler``), which runs
in a process of its own (``brainvq.sampler_process``: there no other thread competes with it for Python's GIL),
so that many users share each step's fixed cost; each request's codes are still exactly those it would get
alone. Each request streams only its own frames: its code grids so far, every code drawn in the brightness of
the patch it decodes to, beside the grids decoded with a neutral code (the background's) where nothing is
sampled yet, so the brain appears row by row. One render thread draws every frame from the newest grids, so
drawing never takes more than one core, and frames come less often when drawing them all would keep that
thread busy more than ``RENDER_SHARE`` of the time.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import numpy as np
import torch

from brainvq import data
from brainvq.demo import GenerationError, WeakMemo, require_bundle
from brainvq.sampler_process import SamplerProcess
from brainvq.sampling import SampleProgress, default_settings
from brainvq.visualize import to_uint8
from brainvq.vqvae import VQVAE

MAX_SAMPLES = 16
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1
MAX_GRIDS = 256            # grids sampled at once; more requests wait for a row start with room
FRAME_SECONDS = 0.5        # a user's frames are at least this far apart, and further with many users:
RENDER_SHARE = 0.3         # drawing frames may keep one core busy this share of the time (decoding is costly)
TILES = (256, 128)         # pixels per grid in the live view: up to 4 samples, more (the final images: full size)
UNSAMPLED = (40, 60, 140)  # colour of code positions not sampled yet
COLOUR_NOTE = ("Each code is drawn in the mean brightness of the 4×4-pixel patch it decodes to; blue: not sampled "
               "yet. Right of each grid: the grid decoded, with background code where nothing is sampled yet. "
               "The background uses several black codes: along the frame's edges the encoder sees its zero "
               "padding, so the two outermost rows and columns get black codes of their own (in a random palette "
               "they show as coloured stripes).")


# ----------------------------------------------------------------------------- settings


def _as_int(value, name: str) -> int:
    if value is None or isinstance(value, bool):
        raise GenerationError(f"{name} must be a whole number.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GenerationError(f"{name} must be a whole number, not {value!r}.") from None
    if not math.isfinite(number) or number != int(number):
        raise GenerationError(f"{name} must be a whole number, not {value!r}.")
    return int(number)


def _as_float(value, problem: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise GenerationError(problem) from None


def start_settings(bundle) -> tuple[float, int, float]:
    """The Generate tab's starting temperature, top-k (0 = off) and top-p (1 = off): the defaults chosen on
    validation for the loaded prior (its config's "sampling"), else plain sampling."""
    chosen = default_settings(bundle.prior) if bundle is not None and bundle.prior is not None else {}
    return (float(chosen.get("temperature", 1.0)), int(chosen.get("top_k") or 0),
            float(chosen.get("top_p") or 1.0))


def check_generation(n, temperature, top_k, top_p, seed, num_codes: int
                     ) -> tuple[int, float, int | None, float | None, int]:
    """Validate generation settings; returns (n, temperature, top_k, top_p, seed), top-k and top-p None when off."""
    n = _as_int(n, "The number of samples")
    if not 1 <= n <= MAX_SAMPLES:
        raise GenerationError(f"The number of samples must be between 1 and {MAX_SAMPLES}, not {n}.")
    temperature = _as_float(temperature, f"Temperature must be a number between 0 and {MAX_TEMPERATURE}.")
    if not 0.0 <= temperature <= MAX_TEMPERATURE:  # also catches NaN
        raise GenerationError(f"Temperature must be between 0 and {MAX_TEMPERATURE:g} (0 = greedy), "
                              f"not {temperature:g}.")
    top_k = _as_int(top_k, "Top-k")
    if not 0 <= top_k <= num_codes:
        raise GenerationError(f"Top-k must be between 0 (off) and K = {num_codes}, not {top_k}.")
    top_p = _as_float(top_p, "Top-p must be a number above 0 and at most 1 (1 = off).")
    if not 0.0 < top_p <= 1.0:
        raise GenerationError(f"Top-p must be above 0 and at most 1 (1 = off), not {top_p:g}.")
    seed = _as_int(seed, "The seed")
    if not 0 <= seed <= MAX_SEED:
        raise GenerationError(f"The seed must be between 0 and {MAX_SEED}, not {seed}.")
    return n, temperature, (top_k or None), (top_p if top_p < 1 else None), seed


# ----------------------------------------------------------------------------- what codes look like


@dataclass
class CodeLook:
    """How one VQ-VAE's codes are shown: a grey level per code, the neutral (background) code, and how many
    code rows away a code still changes the decoded pixels."""

    levels: torch.Tensor   # (K,) uint8 mean brightness of each code's decoded patch
    neutral: int           # the code of a black background, away from the frame's edges
    reach: int             # decoded pixels of code row r depend on code rows r - reach .. r + reach
    blank: torch.Tensor    # (1,1,H,W) a grid of neutral codes, decoded
    grid: int              # code positions per side
    _empty_views: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    @torch.no_grad()
    def of(cls, vqvae: VQVAE) -> "CodeLook":
        reach = _decoder_reach(vqvae)
        size, scale, k = 2 * reach + 1, vqvae.cfg.downsample, vqvae.cfg.num_codes
        device = next(vqvae.parameters()).device
        grids = torch.arange(k, device=device).view(k, 1, 1).expand(k, size, size)   # each code alone, far from edges
        middle = slice(reach * scale, (reach + 1) * scale)
        means = torch.cat([vqvae.decode(chunk)[:, 0, middle, middle].mean((1, 2)) for chunk in grids.split(64)])
        levels = (means.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        black = vqvae.encode(torch.zeros(1, 1, data.IMAGE_SIZE, data.IMAGE_SIZE, device=device))
        neutral = int(black.flatten().mode().values)
        return cls(levels, neutral, reach, vqvae.decode(torch.full_like(black, neutral)), black.shape[-1])

    def empty_view(self, n: int) -> np.ndarray:
        """The live view of ``n`` grids with nothing sampled yet: every request's first frame, drawn once per n."""
        if n not in self._empty_views:
            empty = SampleProgress(torch.full((n, self.grid, self.grid), -1, dtype=torch.long), 0, self.grid ** 2)
            self._empty_views[n] = live_view(empty, self.blank.expand(n, -1, -1, -1), self)
        return self._empty_views[n]


def _decoder_reach(vqvae: VQVAE, size: int = 24) -> int:
    """Code rows around a row that its decoded pixels depend on, found through the gradient of random codes."""
    z = torch.randn(1, vqvae.cfg.code_dim, size, size, requires_grad=True)
    scale, middle = vqvae.cfg.downsample, size // 2
    with torch.enable_grad():
        grad, = torch.autograd.grad(vqvae.decoder(z)[..., middle * scale:(middle + 1) * scale, :].sum(), z)
    rows = (grad[0].abs().sum((0, 2)) > 0).nonzero().flatten()
    return int((rows - middle).abs().max())


_looks: WeakMemo[VQVAE, CodeLook] = WeakMemo(CodeLook.of)


def code_look(vqvae: VQVAE) -> CodeLook:
    """``CodeLook`` of ``vqvae``, computed once per model."""
    return _looks(vqvae)


def shade_codes(codes: torch.Tensor, look: CodeLook, size: int) -> np.ndarray:
    """(h,w) codes (-1 = not sampled) -> (size,size,3) uint8: each code in its grey level, unsampled in blue."""
    grey = look.levels[codes.clamp_min(0)].numpy()
    rgb = np.repeat(grey[..., None], 3, -1)
    rgb[codes.numpy() < 0] = UNSAMPLED
    return rgb.repeat(size // len(codes), 0).repeat(size // len(codes), 1)


class LiveDecoder:
    """Decodes a request's partly filled grids frame after frame, re-decoding only the rows that changed.

    Unsampled positions take the neutral code. A code row changes the pixels of the code rows within ``reach``;
    decoding those rows with ``reach`` more rows of context on each side gives exactly the pixels of a decode of
    the whole grid, so each frame costs the rows sampled since the last one plus a margin, not a whole decode.
    """

    def __init__(self, vqvae: VQVAE, look: CodeLook, n: int):
        self.vqvae, self.look, self.size = vqvae, look, look.blank.shape[-1] // vqvae.cfg.downsample
        self.scale = vqvae.cfg.downsample
        self.device = next(vqvae.parameters()).device
        self.images = look.blank.expand(n, -1, -1, -1).clone()   # (n,1,H,W)
        self.filled = 0

    @torch.no_grad()
    def update(self, progress: SampleProgress) -> torch.Tensor:
        """(n,1,H,W) images of the grids in ``progress`` (positions filled since the last call, in raster order)."""
        if progress.filled > self.filled:
            first, last = self.filled // self.size, (progress.filled - 1) // self.size   # code rows that changed
            reach, scale = self.look.reach, self.scale
            top, bottom = max(0, first - reach), min(self.size, last + reach + 1)        # pixel rows to redraw
            start, stop = max(0, top - reach), min(self.size, bottom + reach)             # code rows to decode
            codes = progress.codes[:, start:stop].to(self.device)
            quantized = self.vqvae.quantizer.lookup(codes.masked_fill(codes < 0, self.look.neutral))
            decoded = self.vqvae.decoder(quantized.contiguous(memory_format=torch.channels_last))  # faster convs
            self.images[:, :, top * scale:bottom * scale] = decoded[:, :, (top - start) * scale:(bottom - start) * scale]
            self.filled = progress.filled
        return self.images


def mosaic(tiles: Sequence[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
    """Tile equally sized RGB images into rows of ``columns`` with a white gap."""
    h, w, _ = tiles[0].shape
    cols = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return out


def live_view(progress: SampleProgress, images: torch.Tensor, look: CodeLook) -> np.ndarray:
    """Each grid's codes beside its decoded image: up to 4 samples in pairs of 256-pixel tiles, 2 pairs a row;
    more in 128-pixel tiles, 4 pairs a row (the view stays about 1,040 pixels wide)."""
    tile = TILES[0] if len(images) <= 4 else TILES[1]
    pairs = []
    for codes, image in zip(progress.codes, images):
        small = torch.nn.functional.adaptive_avg_pool2d(image, tile) if image.shape[-1] != tile else image
        grey = np.repeat(to_uint8(small)[..., None], 3, -1)
        pairs.append(mosaic([shade_codes(codes, look, tile), grey], columns=2, gap=2))
    return mosaic(pairs, columns=2 if len(pairs) <= 4 else 4, gap=8)


# ----------------------------------------------------------------------------- the shared loop


@dataclass
class GenerationFrame:
    """One streamed frame of a request: the live view and its codes (-1 where not sampled yet); ``images``
    (decoded, full size) on the last frame of a finished request."""

    view: np.ndarray
    codes: np.ndarray        # (n,H,W) int64
    filled: int
    total: int
    seed: int
    stopped: bool = False
    images: list[np.ndarray] | None = None

    @property
    def done(self) -> bool:
        return self.images is not None

    def status(self) -> str:
        if self.done:
            return f"Done: {len(self.images)} sample(s), seed {self.seed}."
        if self.stopped:
            return f"Stopped at {self.filled:,} of {self.total:,} positions (seed {self.seed})."
        return f"Sampling codes… {self.filled:,} of {self.total:,} positions ({100 * self.filled // self.total}%)"


class Ticket:
    """The app's copy of one request in the sampler process: its grids so far, filled in a row at a time."""

    def __init__(self, n: int, seed: int, size: int):
        self.n, self.seed, self.size, self.total = n, seed, size, size * size
        self.codes = torch.full((n, size, size), -1, dtype=torch.long)
        self.filled = 0
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.filled == self.total

    def progress(self) -> SampleProgress:
        return SampleProgress(self.codes.clone(), self.filled, self.total)


class Job:
    """One request of the shared loop, and the newest grids it has not shown yet."""

    def __init__(self, request: Ticket, generator: "Generator", bundle, session: str | None):
        self.request, self.generator, self.bundle, self.session = request, generator, bundle, session
        self.ident = self.child = 0               # its id and child in the sampler process
        self.frames = 0                           # frames posted
        self.next_frame = 0.0                     # monotonic time from which a new frame is sent
        self.decoder: LiveDecoder | None = None   # made by the render thread
        self.error: str | None = None             # why the loop could not finish it
        self.ended = False                        # its last frame is posted
        self._latest: tuple[int, SampleProgress | None, bool] = (0, None, False)  # (count, grids, finished)
        self._taken = 0
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()

    def post(self, finished: bool = False) -> None:
        """From any thread: the request's grids now (replacing any not taken yet); ``finished``: the last."""
        self._latest = (self._latest[0] + 1, self.request.progress(), finished)  # read whole or not at all
        self.frames += 1
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.stop()

    async def next(self) -> tuple[SampleProgress, bool]:
        """The newest grids not taken yet, and whether they are the last."""
        while self._latest[0] == self._taken:
            self._ready.clear()
            await self._ready.wait()
        self._taken, progress, finished = self._latest
        return progress, finished

    def stop(self) -> None:
        if not (self.ended or self.request.cancelled):
            self.request.cancelled = True
            self.generator.process.cancel(self.ident)


class Generator:
    """The shared sampling loop: one ``SamplerProcess`` samples every request; as its rows come back, each
    request gets a frame at most every ``frame_seconds``, less often when drawing every request's frames would
    keep the render thread busy more than ``render_share`` of the time, and a last one when it ends."""

    def __init__(self, frame_seconds: float = FRAME_SECONDS, render_share: float = RENDER_SHARE,
                 max_grids: int = MAX_GRIDS, threads: int = 1):
        self.frame_seconds, self.render_share = frame_seconds, render_share
        self.render_seconds = 0.0                 # time to draw a frame, a running average
        self.positions = 0                        # positions sampled so far, for anyone watching
        self.process = SamplerProcess(self._on_message, self._on_exit, threads, max_grids)
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._render = ThreadPoolExecutor(1, thread_name_prefix="brainvq-render")

    @property
    def jobs(self) -> list[Job]:
        """The requests not ended yet."""
        with self._lock:
            return list(self._jobs.values())

    def start(self) -> None:
        """Start the sampler process now, so that the first request does not wait for it."""
        self.process.start()

    def close(self) -> None:
        """End the sampler process (its requests end with an error); a later request starts a new one."""
        self.process.close()

    def submit(self, bundle, n, temperature, top_k, top_p, seed, session: str | None = None) -> Job:
        """Validate the settings and queue a request (call from the event loop the frames go to)."""
        bundle = require_bundle(bundle)
        if bundle.prior is None:
            raise GenerationError("The loaded models have no PixelCNN prior, so they cannot generate. Load a bundle "
                                  "with a pixelcnn/ folder in the Models tab; Reconstruct still works.")
        n, temperature, top_k, top_p, seed = check_generation(n, temperature, top_k, top_p, seed,
                                                              bundle.vqvae.cfg.num_codes)
        job = Job(Ticket(n, seed, bundle.prior.cfg.grid_size), self, bundle, session)
        with self._lock:  # registered before the sampler process can answer about it
            job.child, job.ident = self.process.add(bundle.prior, n, temperature, top_k, top_p, seed)
            self._jobs[job.ident] = job
        return job

    def stop_session(self, session: str) -> int:
        """Stop every request of one browser session; returns how many."""
        jobs = [job for job in self.jobs if job.session == session]
        for job in jobs:
            job.stop()
        return len(jobs)

    def _on_message(self, message: tuple) -> None:
        """From the listener thread: what the sampler process reports (see brainvq.sampler_process)."""
        kind, self.positions, *args = message
        with self._lock:
            if kind == "started":
                for job in filter(None, map(self._jobs.get, args[0])):
                    job.post()                   # at once: nothing to decode yet
            elif kind == "rows":
                now = time.monotonic()
                interval = max(self.frame_seconds, len(self._jobs) * self.render_seconds / self.render_share)
                for ident, row, codes in args[0]:
                    job = self._jobs.get(ident)
                    if job is None:
                        continue
                    job.request.codes[:, row] = torch.from_numpy(codes)
                    job.request.filled = (row + 1) * job.request.size
                    if job.request.done:
                        self._end(job)
                    elif job.frames == 1 or now >= job.next_frame:   # its first row as soon as done
                        job.post()
                        job.next_frame = now + interval
            elif kind == "stopped":
                ident, filled, row, codes = args
                if (job := self._jobs.get(ident)) is not None:
                    job.request.codes[:, row] = torch.from_numpy(codes)
                    job.request.filled = filled
                    self._end(job)
            elif kind == "failed":
                for job in filter(None, map(self._jobs.get, args[0])):
                    self._end(job, f"sampling failed ({args[1]})")

    def _on_exit(self, code: int, child: int) -> None:
        with self._lock:
            for job in [job for job in self._jobs.values() if job.child == child]:
                self._end(job, f"the sampler process ended (exit code {code})")

    def _end(self, job: Job, error: str | None = None) -> None:
        """(Under the lock.) Its last frame; it leaves the loop."""
        job.error, job.ended = error, True
        del self._jobs[job.ident]
        job.post(finished=True)

    async def stream(self, bundle, n, temperature, top_k, top_p, seed,
                     session: str | None = None) -> AsyncIterator[GenerationFrame]:
        """The frames of one request, its last one with the decoded images (or stopped); closing the stream
        stops the request."""
        job = self.submit(bundle, n, temperature, top_k, top_p, seed, session)
        loop = asyncio.get_running_loop()
        try:
            while True:
                progress, finished = await job.next()
                if job.error:
                    raise GenerationError(f"The generation stopped: {job.error}. Please try again.")
                frame = await loop.run_in_executor(self._render, self._draw, job, progress, finished)
                yield frame
                if finished:
                    return
        finally:
            job.stop()

    def _draw(self, job: Job, progress: SampleProgress, finished: bool) -> GenerationFrame:
        vqvae = job.bundle.vqvae
        look = code_look(vqvae)            # once per model: not part of a frame's cost
        began = time.perf_counter()
        if job.decoder is None and progress.filled:
            job.decoder = LiveDecoder(vqvae, look, job.request.n)
        images = job.decoder.update(progress) if job.decoder else look.blank.expand(job.request.n, -1, -1, -1)
        view = live_view(progress, images, look) if progress.filled else look.empty_view(job.request.n)
        frame = GenerationFrame(view, progress.codes.numpy(), progress.filled, progress.total, job.request.seed)
        if progress.done:
            frame.images = [to_uint8(image) for image in images]
        elif finished:
            frame.stopped = True
        if progress.filled:                # the first frame (nothing sampled yet) is drawn once per n
            self.render_seconds = 0.8 * self.render_seconds + 0.2 * (time.perf_counter() - began)
        return frame

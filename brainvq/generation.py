"""What the Generate tab runs: one sampling loop shared by every user, and the live view of grids filling in.

Every Generate request joins the batched sampler of its prior (``brainvq.sampling.BatchSampler``), stepped by
one background thread, so that many users share each step's fixed cost; each request's codes are still exactly
those it would get alone. Each request streams only its own frames: its code grids so far, every code drawn
in the brightness of the patch it decodes to, beside the grids decoded with a neutral code (the background's)
where nothing is sampled yet, so the brain appears row by row. One render thread draws every frame from the
newest grids, so drawing never takes more than one core from the sampler, and frames come less often when
drawing them all would keep that thread busy more than ``RENDER_SHARE`` of the time.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
import traceback
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import numpy as np
import torch

from brainvq import data
from brainvq.demo import GenerationError, require_bundle
from brainvq.sampling import BatchSampler, Request, SampleProgress, default_settings
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
        return cls(levels, neutral, reach, vqvae.decode(torch.full_like(black, neutral)))


def _decoder_reach(vqvae: VQVAE, size: int = 24) -> int:
    """Code rows around a row that its decoded pixels depend on, found through the gradient of random codes."""
    z = torch.randn(1, vqvae.cfg.code_dim, size, size, requires_grad=True)
    scale, middle = vqvae.cfg.downsample, size // 2
    with torch.enable_grad():
        grad, = torch.autograd.grad(vqvae.decoder(z)[..., middle * scale:(middle + 1) * scale, :].sum(), z)
    rows = (grad[0].abs().sum((0, 2)) > 0).nonzero().flatten()
    return int((rows - middle).abs().max())


_LOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOOKS_LOCK = threading.Lock()


def code_look(vqvae: VQVAE) -> CodeLook:
    """``CodeLook`` of ``vqvae``, computed once per model."""
    with _LOOKS_LOCK:
        if vqvae not in _LOOKS:
            _LOOKS[vqvae] = CodeLook.of(vqvae)
        return _LOOKS[vqvae]


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


class Job:
    """One request in the shared loop, and the newest grids it has not shown yet."""

    def __init__(self, request: Request, sampler: BatchSampler, bundle, session: str | None):
        self.request, self.sampler, self.bundle, self.session = request, sampler, bundle, session
        self.frames = 0                           # frames posted
        self.next_frame = 0.0                     # monotonic time from which the loop sends a new frame
        self.decoder: LiveDecoder | None = None   # made by the render thread
        self.error: str | None = None             # why the loop could not finish it
        self._latest: tuple[int, SampleProgress | None, bool] = (0, None, False)  # (count, grids, finished)
        self._taken = 0
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()

    def post(self, progress: SampleProgress, finished: bool = False) -> None:
        """From the loop's thread: the newest grids (replacing any not taken yet); ``finished``: the last."""
        self._latest = (self._latest[0] + 1, progress, finished)  # one assignment: read whole or not at all
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
        self.sampler.cancel(self.request)


class Generator:
    """The shared sampling loop: one thread steps one ``BatchSampler`` per prior and posts each request's grids
    at most every ``frame_seconds``, less often when drawing every request's frames would keep the render
    thread busy more than ``render_share`` of the time, and once more when it ends."""

    def __init__(self, frame_seconds: float = FRAME_SECONDS, render_share: float = RENDER_SHARE,
                 max_grids: int = MAX_GRIDS):
        self.frame_seconds, self.render_share, self.max_grids = frame_seconds, render_share, max_grids
        self.render_seconds = 0.0                 # time to draw a frame, a running average
        self.jobs: list[Job] = []
        self.positions = 0                        # positions sampled by this loop, for anyone watching it
        self._samplers: dict[int, BatchSampler] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._render = ThreadPoolExecutor(1, thread_name_prefix="brainvq-render")

    def submit(self, bundle, n, temperature, top_k, top_p, seed, session: str | None = None) -> Job:
        """Validate the settings and queue a request (call from the event loop the frames go to)."""
        bundle = require_bundle(bundle)
        if bundle.prior is None:
            raise GenerationError("The loaded models have no PixelCNN prior, so they cannot generate. Load a bundle "
                                  "with a pixelcnn/ folder in the Models tab; Reconstruct still works.")
        n, temperature, top_k, top_p, seed = check_generation(n, temperature, top_k, top_p, seed,
                                                              bundle.vqvae.cfg.num_codes)
        with self._lock:
            sampler = self._samplers.get(id(bundle.prior))
            if sampler is None or sampler.prior is not bundle.prior:
                sampler = self._samplers[id(bundle.prior)] = BatchSampler(bundle.prior, max_grids=self.max_grids)
            job = Job(sampler.add(n, temperature, top_k, top_p, seed), sampler, bundle, session)
            self.jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="brainvq-sampler", daemon=True)
                self._thread.start()
        self._wake.set()
        return job

    def stop_session(self, session: str) -> int:
        """Stop every request of one browser session; returns how many."""
        with self._lock:
            jobs = [job for job in self.jobs if job.session == session]
        for job in jobs:
            job.stop()
        return len(jobs)

    def _run(self) -> None:
        while True:
            with self._lock:
                samplers = [s for s in self._samplers.values() if s.busy]
                jobs = list(self.jobs)
            if not jobs:
                self._wake.wait()
                self._wake.clear()
                continue
            for sampler in samplers:
                try:
                    self.positions += sum(r.n for r in sampler.step())
                except Exception as error:  # noqa: BLE001 - end its requests with the reason, keep serving the others
                    traceback.print_exc()
                    for job in jobs:
                        if job.sampler is sampler:
                            job.error = f"sampling failed ({type(error).__name__}: {error})"
                            job.stop()
                    with self._lock:
                        self._samplers = {k: v for k, v in self._samplers.items() if v is not sampler}
            now = time.monotonic()
            interval = max(self.frame_seconds, len(jobs) * self.render_seconds / self.render_share)
            ended = []
            for job in jobs:
                request = job.request
                if request.done or request.cancelled:
                    job.post(request.progress() if job.error else job.sampler.progress(request), finished=True)
                    ended.append(job)
                elif job.frames == 0 and request.started:  # at once, as it starts: nothing to decode yet
                    job.post(request.progress())
                elif (job.frames == 1 and request.filled >= request.size  # its first row, as soon as done
                      or job.frames > 1 and now >= job.next_frame):
                    job.post(job.sampler.progress(request))
                    job.next_frame = now + interval
            if ended:
                with self._lock:
                    self.jobs = [job for job in self.jobs if job not in ended]
                    for key, sampler in list(self._samplers.items()):
                        if not sampler.busy and not any(job.sampler is sampler for job in self.jobs):
                            del self._samplers[key]

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
        began = time.perf_counter()
        vqvae = job.bundle.vqvae
        look = code_look(vqvae)
        if job.decoder is None and progress.filled:
            job.decoder = LiveDecoder(vqvae, look, job.request.n)
        images = job.decoder.update(progress) if job.decoder else look.blank.expand(job.request.n, -1, -1, -1)
        view = live_view(progress, images, look)
        frame = GenerationFrame(view, progress.codes.numpy(), progress.filled, progress.total, job.request.seed)
        if progress.done:
            frame.images = [to_uint8(image) for image in images]
        elif finished:
            frame.stopped = True
        self.render_seconds = 0.8 * self.render_seconds + 0.2 * (time.perf_counter() - began)
        return frame

"""Sampling code grids from the gated PixelCNN: one batched engine for many requests, observable as it fills in.

A ``Request`` is one caller's ``n`` grids with its own temperature, top-k, top-p, seed and optionally ``known``
codes to keep. A ``BatchSampler`` advances every request it holds by one position per ``step`` in one batch, so
many callers share each step's fixed cost. Requests join at the start of a row and leave at any step.

Randomness: a uniform number per position is drawn up front from the request's seed and turned into a code by
inverse CDF, so a request's codes depend only on its seed, settings and the prior, never on what else is in the
batch: each row of the batch is computed with the same arithmetic whatever the other rows hold. (Small matrix
products are row-independent in float32 once they have ``MIN_ROWS`` rows; smaller batches are padded to it.
The vertical stack's large-K products run one per grid, batched, as the BLAS's kernel for one product over
many rows depends on the row count. tests/test_sampling.py checks it bit for bit.)

Two ways to get the logits, with identical codes for the same seed:

* ``naive``: reruns the whole network on the whole grid for every position (O(H*W) full passes);
* ``fast``: caches activations (in the spirit of Ramachandran et al., 2017, "Fast Generation for
  Convolutional Autoregressive Models"). The vertical stack of row i depends only on rows < i, so it is
  computed once per row, for that row alone, from the few rows above it that each layer reads (kept in ring
  buffers). The horizontal stack then advances one position at a time from row buffers, so each step costs a
  few small matrix products per layer.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from brainvq.pixelcnn import GatedPixelCNN, gate

METHODS = ("fast", "naive")
GREEDY = 1e-6          # temperatures at or below this pick the most likely code
MIN_ROWS = 12          # batches are padded to this many rows: see the module docstring


@dataclass
class SampleProgress:
    """A partly filled grid: ``codes`` holds -1 where nothing has been sampled yet (kept codes are there from
    the start); ``filled`` positions of the raster order are done."""

    codes: torch.Tensor
    filled: int
    total: int

    @property
    def done(self) -> bool:
        return self.filled == self.total


@dataclass
class Settings:
    """Sampling settings of a batch, one row per grid, ready for ``draw``; None where every row has it off."""

    temperature: torch.Tensor              # (B,1) float64; 1 for greedy rows
    greedy: torch.Tensor | None            # (B,) bool
    top_k: torch.Tensor | None             # (B,1) codes kept; K where off
    top_p: torch.Tensor | None             # (B,1) float64; 1 where off

    @classmethod
    def of(cls, rows: int, num_codes: int, temperature: float | torch.Tensor, top_k: int | torch.Tensor | None = None,
           top_p: float | torch.Tensor | None = None, device: torch.device | str = "cpu") -> "Settings":
        """Each setting is one value or one per row. Temperature <= 1e-6 is greedy; top_k None or 0 and top_p
        None or 1 are off."""
        temperature = torch.as_tensor(temperature, dtype=torch.float64, device=device).expand(rows)
        greedy = temperature <= GREEDY
        top_k = torch.as_tensor(0 if top_k is None else top_k, device=device).expand(rows)
        top_k = torch.where((top_k > 0) & (top_k < num_codes), top_k, num_codes)
        top_p = torch.as_tensor(1.0 if top_p is None else top_p, dtype=torch.float64, device=device).expand(rows)
        return cls(torch.where(greedy, 1.0, temperature).unsqueeze(1), greedy if greedy.any() else None,
                   top_k.unsqueeze(1) if (top_k < num_codes).any() else None,
                   top_p.unsqueeze(1) if (top_p < 1).any() else None)

    def take(self, index: torch.Tensor) -> "Settings":
        return Settings(*[None if t is None else t[index] for t in
                          (self.temperature, self.greedy, self.top_k, self.top_p)])


def default_settings(prior: GatedPixelCNN) -> dict:
    """The sampling settings chosen on validation for this prior (``"sampling"`` in its config.json), as keyword
    arguments of ``sample_codes``; temperature 1 and no truncation when the checkpoint has none."""
    return dict(prior.meta.get("sampling", {"temperature": 1.0}))


def draw(logits: torch.Tensor, uniform: torch.Tensor, settings: Settings) -> torch.Tensor:
    """(B,K) logits + (B,) uniforms -> (B,) codes by inverse CDF. Top-k keeps the k most likely codes, top-p
    the fewest most likely codes whose probability sums to at least p (after temperature and top-k); greedy
    rows take the argmax. A row's code depends only on that row's inputs and settings."""
    k_max = logits.shape[1]
    scaled = logits.double() / settings.temperature
    if settings.top_k is not None or settings.top_p is not None:
        ordered, order = scaled.sort(dim=-1, descending=True, stable=True)
        drop = torch.zeros_like(ordered, dtype=torch.bool)
        if settings.top_k is not None:
            drop = torch.arange(k_max, device=logits.device) >= settings.top_k
        if settings.top_p is not None:
            probs = ordered.masked_fill(drop, float("-inf")).softmax(-1)
            before = probs.cumsum(-1) - probs    # probability of the more likely codes
            drop = drop | ((before >= settings.top_p) & (settings.top_p < 1))
        scaled = scaled.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    cdf = scaled.softmax(-1).cumsum(-1)
    index = torch.searchsorted(cdf, (uniform.double() * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp_max(k_max - 1)
    return index if settings.greedy is None else torch.where(settings.greedy, logits.argmax(-1), index)


def pick(logits: torch.Tensor, uniform: torch.Tensor, temperature: float | torch.Tensor,
         top_k: int | torch.Tensor | None = None, top_p: float | torch.Tensor | None = None) -> torch.Tensor:
    """``draw`` with settings given as one value or one per row (see ``Settings.of``)."""
    return draw(logits, uniform, Settings.of(len(logits), logits.shape[1], temperature, top_k, top_p,
                                             logits.device))


def check_settings(n: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be positive, 0 or None (off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None (off), got {top_p}")


def _check_known(known: torch.Tensor | None, n: int, size: int, num_codes: int) -> torch.Tensor:
    """``known`` as (n,H,W) long: -1 to sample, a code in [0, K) to keep."""
    if known is None:
        return torch.full((n, size, size), -1, dtype=torch.long)
    known = torch.as_tensor(known)
    if known.dtype.is_floating_point or known.dtype == torch.bool:
        raise ValueError(f"known must hold integer codes, not {known.dtype}")
    if known.shape not in ((size, size), (n, size, size)):
        raise ValueError(f"known must be ({size},{size}) or ({n},{size},{size}) for this prior, "
                         f"not {tuple(known.shape)}")
    if known.numel() and (known.min() < -1 or known.max() >= num_codes):
        raise ValueError(f"known codes must be -1 (sample) or in [0, {num_codes}); "
                         f"got values from {int(known.min())} to {int(known.max())}")
    return known.long().cpu().expand(n, size, size).clone()


class Request:
    """One caller's ``n`` grids inside a ``BatchSampler``: its settings, its random numbers and codes so far."""

    def __init__(self, size: int, num_codes: int, n: int = 1, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, known: torch.Tensor | None = None):
        check_settings(n, temperature, top_k, top_p)
        self.n, self.size, self.seed = n, size, seed
        self.temperature, self.top_k, self.top_p = float(temperature), top_k or 0, float(top_p or 1.0)
        self.uniforms = torch.rand(n, size, size, generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.float64)
        self.codes = _check_known(known, n, size, num_codes)
        self.free = self.codes < 0                # the positions to sample
        self.filled = 0                           # positions of the raster order done
        self.started = False                      # admitted to the batch
        self.cancelled = False
        self.state: dict = {}                     # the engine's caches for this request

    @property
    def total(self) -> int:
        return self.size * self.size

    @property
    def done(self) -> bool:
        return self.filled == self.total

    @property
    def row(self) -> int:
        return self.filled // self.size

    def progress(self) -> SampleProgress:
        return SampleProgress(self.codes.clone(), self.filled, self.total)


class BatchSampler:
    """Advances every request it holds by one position per ``step``, all in one batch.

    All requests sample the same column at each step, each in its own row; a new request waits for the next
    column 0 (at most one row of steps), and for room when ``max_grids`` grids are being sampled. ``add`` and
    ``cancel`` may be called from any thread, ``step`` and ``progress`` from one thread at a time.
    """

    def __init__(self, prior: GatedPixelCNN, method: str = "fast", max_grids: int | None = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.prior, self.method, self.max_grids = prior.eval(), method, max_grids
        self.size, self.num_codes = prior.cfg.grid_size, prior.cfg.num_codes
        self.active: list[Request] = []
        self.column = 0
        self.steps = 0                           # steps taken, for anyone watching the sampler work
        self._joining: list[Request] = []
        self._lock = threading.Lock()
        self._net = _FastLogits(prior) if method == "fast" else _NaiveLogits(prior)

    def add(self, n: int = 1, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
            seed: int = 0, known: torch.Tensor | None = None) -> Request:
        """A new request; it starts at the next row start (at once when the sampler is idle)."""
        request = Request(self.size, self.num_codes, n, temperature, top_k, top_p, seed, known)
        with self._lock:
            self._joining.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Drop ``request`` before the next step; the others are not disturbed."""
        request.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.active or self._joining)

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Sample one position of every active request; returns those that advanced. Finished requests leave."""
        if any(r.cancelled for r in self.active):
            self._drop_cancelled()
        if self.column == 0:
            self._admit()
            if not self.active:
                return []
            self._start_row()
        j = self.column
        if j <= self.last_free:  # else every remaining position of the row is kept: no logits needed
            logits = self._net.logits(self.active, self.codes, j)[:len(self.codes)]
            codes = draw(logits, self.uniforms[:, j], self.settings)
            self.codes[:, j] = torch.where(self.free[:, j], codes, self.codes[:, j]) if self.keeps else codes
        self._net.advance(self.active, self.codes[:, j], j)
        self.column = (j + 1) % self.size
        self.steps += 1
        advanced = self.active
        if self.column == 0:
            self._flush(self.active)
            self.active = [r for r in self.active if not r.done]
        return advanced

    def _admit(self) -> None:
        """Waiting requests join, first come first served, while there is room."""
        with self._lock:
            room = (self.max_grids or math.inf) - sum(r.n for r in self.active)
            waiting, self._joining = [r for r in self._joining if not r.cancelled], []
            for request in waiting:
                if not self._joining and (request.n <= room or not self.active):
                    self.active.append(request)
                    request.started = True
                    room -= request.n
                else:  # no overtaking: a big request is not starved by small ones
                    self._joining.append(request)

    def progress(self, request: Request) -> SampleProgress:
        """``request``'s grids as sampled so far (call it from the thread that steps)."""
        if self.column and request in self.active:  # at column 0 every row is already flushed
            self._flush([request])
        return request.progress()

    def _flush(self, requests: list[Request]) -> None:
        """Copy the current row's codes into ``requests`` and count their filled positions."""
        done = self.column or self.size
        for request in requests:
            start = self.offsets[request]
            request.codes[:, request.row, :done] = self.codes[start:start + request.n, :done].cpu()
            request.filled = request.row * self.size + done

    def _start_row(self) -> None:
        """Per-grid settings and the current row's uniforms, codes (kept or -1) and free mask, stacked."""
        owners = [r for r in self.active for _ in range(r.n)]
        device = self._net.device
        self.offsets, start = {}, 0
        for request in self.active:
            self.offsets[request], start = start, start + request.n
        self.settings = Settings.of(len(owners), self.num_codes,
                                    torch.tensor([r.temperature for r in owners], dtype=torch.float64),
                                    torch.tensor([r.top_k for r in owners]),
                                    torch.tensor([r.top_p for r in owners], dtype=torch.float64), device)
        self.uniforms = torch.cat([r.uniforms[:, r.row] for r in self.active]).to(device)
        self.codes = torch.cat([r.codes[:, r.row] for r in self.active]).to(device)
        self.free = torch.cat([r.free[:, r.row] for r in self.active]).to(device)
        self._update_last_free()
        self._net.start_row(self.active)

    def _drop_cancelled(self) -> None:
        gone = [r for r in self.active if r.cancelled]
        if self.column:
            self._flush(gone)
        keep = torch.tensor([i for r in self.active if not r.cancelled
                             for i in range(self.offsets[r], self.offsets[r] + r.n)], device=self._net.device)
        self.active = [r for r in self.active if not r.cancelled]
        if not self.active:
            self.column = 0  # nobody left in this row: newcomers may start at once
        if self.column == 0:
            return  # the next row start rebuilds everything
        self.offsets, start = {}, 0
        for request in self.active:
            self.offsets[request], start = start, start + request.n
        self.settings = self.settings.take(keep)
        self.uniforms, self.codes, self.free = self.uniforms[keep], self.codes[keep], self.free[keep]
        self._update_last_free()
        self._net.keep(keep)

    def _update_last_free(self) -> None:
        columns = self.free.any(0).nonzero()
        self.last_free = int(columns[-1]) if len(columns) else -1
        self.keeps = not bool(self.free.all())


def _row_spans(requests: list[Request]) -> list[tuple[int, int, int]]:
    """(first, stop, row) over the batch's grids: runs of consecutive requests at the same row."""
    spans, start = [], 0
    for r in requests:
        if spans and spans[-1][2] == r.row:
            spans[-1] = (spans[-1][0], start + r.n, r.row)
        else:
            spans.append((start, start + r.n, r.row))
        start += r.n
    return spans


def _row_buffer(like: torch.Tensor, rows: int, width: int, channels: int, pad: int) -> torch.Tensor:
    """A horizontal-stack row buffer: zeros in the left padding and the padding rows; the other columns are
    written (step by step) before they are read, so they are left unset."""
    out = like.new_empty(rows, width, channels)
    out[:, :pad] = 0
    out[len(like):] = 0
    return out


def _per_grid(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B,W,K) @ (K,N) + bias as one matrix product per grid, batched. One product over all B*W rows would let
    the BLAS pick its kernel (and so its rounding) by B when K is large; per grid it does not depend on B once
    B >= 2, so batches are padded to two grids."""
    batch = len(x)
    x = _pad_rows(x, 2)
    return torch.baddbmm(bias, x, weight_t.expand(len(x), -1, -1))[:batch]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended along dim 0 up to ``rows``."""
    return torch.cat([t, t.new_zeros(rows - len(t), *t.shape[1:])]) if len(t) < rows else t


class _NaiveLogits:
    """The whole network on the whole grids for every position."""

    def __init__(self, prior: GatedPixelCNN):
        self.prior, self.device = prior, next(prior.parameters()).device

    def start_row(self, requests: list[Request]) -> None:
        pass

    def logits(self, requests: list[Request], row_codes: torch.Tensor, j: int) -> torch.Tensor:
        grids = torch.cat([r.codes for r in requests]).to(self.device)
        rows = torch.tensor([r.row for r in requests for _ in range(r.n)], device=self.device)
        index = torch.arange(len(grids), device=self.device)
        grids[index, rows] = row_codes
        return self.prior(grids)[index, :, rows, j]

    def advance(self, requests: list[Request], codes: torch.Tensor, j: int) -> None:
        pass

    def keep(self, index: torch.Tensor) -> None:
        pass


class _FastLogits:
    """Per-row vertical stack and per-position horizontal stack over cached activations.

    Each request keeps, for each layer, a ring buffer of the rows of that layer's vertical-stack input that
    later rows read (layer 0: the k//2 embedded rows above; a dilated layer: the row d above), zeros before the
    first row as the convolutions' padding. The batch keeps each layer's horizontal-stack input for the
    current row (left-padded with zeros, channels last) and the vertical stack's contribution (``link``, plus
    the horizontal convolution's bias) to every column. Convolutions are matrix products over the taps of each
    position, with at least ``MIN_ROWS`` rows.
    """

    def __init__(self, prior: GatedPixelCNN):
        self.prior, self.size = prior, prior.cfg.grid_size
        self.device, self.dtype = next(prior.parameters()).device, next(prior.parameters()).dtype
        self.layers = list(prior.layers)
        self.pad = max(layer.h_pad()[0] for layer in self.layers)
        pos = prior.pos

        def rows_last(conv):  # (2C,H,W) positional term as (H, W, 2C), so a row of it is (W, 2C)
            return conv(pos)[0].permute(1, 2, 0).contiguous() if pos is not None else None

        def taps_last(conv):  # (out, in, kh, kw) -> (out, kh * kw * in): the taps of a position, channels last
            return conv.weight.permute(0, 2, 3, 1).flatten(1).contiguous()

        def matrix(conv):     # a 1x1 convolution as (weight, bias)
            return conv.weight.flatten(1), conv.bias

        with torch.no_grad():
            self.v_pos = [rows_last(layer.v_pos) for layer in self.layers]
            self.h_pos = [rows_last(layer.h_pos) for layer in self.layers]
            self.v_layers = [((taps_last(layer.v_conv).t().contiguous(), layer.v_conv.bias), matrix(layer.link),
                              matrix(layer.v_out))
                             for layer in self.layers]
            # the horizontal stack, looked up once per step: transposed weights for addmm, one per tap
            self.h_layers = []
            for layer in self.layers:
                weight = taps_last(layer.h_conv).t()
                taps = [weight] if layer.first else list(weight.chunk(2))   # dilated: the columns j-d and j
                h_in = None if layer.first else (layer.h_in.weight.flatten(1), layer.h_in.bias)
                self.h_layers.append((layer.first, layer.half if layer.first else layer.dilation, h_in,
                                      [t.contiguous() for t in taps], matrix(layer.h_out)))
            self.h_bias = [layer.h_conv.bias for layer in self.layers]
            self.head = [matrix(m) for m in prior.head if isinstance(m, torch.nn.Conv2d)]
        self.h_src: list[torch.Tensor] = []
        self.links: list[torch.Tensor] = []

    def start_row(self, requests: list[Request]) -> None:
        """Vertical stack of each request's current row (rows above only), its links into the horizontal
        stack, and empty horizontal row buffers."""
        width, batch = self.size, sum(r.n for r in requests)
        padded = max(batch, MIN_ROWS)
        spans = _row_spans(requests)
        for r in requests:
            if not r.state:  # (n, rows kept, W, channels) per layer
                r.state["rings"] = [torch.zeros(r.n, layer.rows if layer.first else layer.dilation, width,
                                                layer.v_conv.in_channels, dtype=self.dtype, device=self.device)
                                    for layer in self.layers]
        self.links, self.h_src = [], []
        current = None                                            # (B, W, C): this layer's input row
        for l, (layer, (v_conv, link_conv, v_out)) in enumerate(zip(self.layers, self.v_layers)):
            if layer.first:  # the rows i-k .. i-1, oldest first
                window = torch.cat([r.state["rings"][0][:, [(r.row + k) % layer.rows for k in range(layer.rows)]]
                                    for r in requests])
                window = F.pad(window, (0, 0, layer.half, layer.half))
                taps = [window[:, k, c:c + width] for k in range(layer.rows) for c in range(2 * layer.half + 1)]
            else:            # the row d above and this row, at columns -d, 0, +d
                d = layer.dilation
                above = torch.cat([r.state["rings"][l][:, r.row % d] for r in requests])
                start = 0
                for r in requests:  # this row becomes the row above for row i + d
                    r.state["rings"][l][:, r.row % d] = current[start:start + r.n]
                    start += r.n
                window = F.pad(torch.stack([above, current], 1), (0, 0, d, d))
                taps = [window[:, k, c * d:c * d + width] for k in range(2) for c in range(3)]
            v_pre = _per_grid(torch.cat(taps, -1), *v_conv).view(batch * width, -1)
            link = (F.linear(v_pre, *link_conv) + self.h_bias[l]).view(batch, width, -1)
            if self.v_pos[l] is not None:  # each grid's row of the positional terms, added in place
                grids = v_pre.view(batch, width, -1)
                for start, stop, row in spans:
                    grids[start:stop] += self.v_pos[l][row]
                    link[start:stop] += self.h_pos[l][row]
            v_new = F.linear(gate(v_pre), *v_out).view(batch, width, -1)
            current = v_new if layer.first else current + v_new
            self.links.append(_pad_rows(link, padded))
            self.h_src.append(_row_buffer(current, padded, width + self.pad, layer.h_conv.in_channels, self.pad))

    def logits(self, requests: list[Request], row_codes: torch.Tensor, j: int) -> torch.Tensor:
        col, h = self.pad + j, None
        for h_src, link, (first, reach, h_in, taps, h_out) in zip(self.h_src, self.links, self.h_layers):
            if first:  # the `reach` codes to the left, as one row of taps
                pre = torch.addmm(link[:, j], h_src[:, col - reach:col].flatten(1), taps[0])
            else:      # this column and the one `reach` (the dilation) to the left
                h_src[:, col] = F.relu(F.linear(h, *h_in))
                pre = torch.addmm(torch.addmm(link[:, j], h_src[:, col - reach], taps[0]), h_src[:, col], taps[1])
            update = F.linear(gate(pre), *h_out)
            h = update if first else h + update
        for weight, bias in self.head:
            h = F.linear(F.relu(h), weight, bias)
        return h

    def advance(self, requests: list[Request], codes: torch.Tensor, j: int) -> None:
        """The code at column j enters the embedding row; a finished row enters each request's ring."""
        self.h_src[0][:len(codes), self.pad + j] = self.prior.embed(codes)
        if j == self.size - 1:
            start, rows = 0, self.layers[0].rows
            for r in requests:
                r.state["rings"][0][:, r.row % rows] = self.h_src[0][start:start + r.n, self.pad:]
                start += r.n

    def keep(self, index: torch.Tensor) -> None:
        padded = max(len(index), MIN_ROWS)
        self.links = [_pad_rows(t[index], padded) for t in self.links]
        self.h_src = [_pad_rows(t[index], padded) for t in self.h_src]


@torch.no_grad()
def sample(prior: GatedPixelCNN, n: int = 1, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, method: str = "fast", every: int | None = None,
           known: torch.Tensor | None = None) -> Iterator[SampleProgress]:
    """Sample ``n`` grids alone; yield the grid every ``every`` positions (default: once per row) and once more
    when it is full. ``known`` ((H,W) or (n,H,W) long): -1 where to sample, a code >= 0 to keep unchanged."""
    sampler = BatchSampler(prior, method)
    request = sampler.add(n, temperature, top_k, top_p, seed, known)
    every, total = every or sampler.size, request.total
    for filled in range(1, total + 1):
        sampler.step()
        if filled % every == 0 or filled == total:
            yield sampler.progress(request)


def sample_codes(prior: GatedPixelCNN, n: int = 1, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, method: str = "fast",
                 callback: Callable[[SampleProgress], None] | None = None,
                 known: torch.Tensor | None = None) -> torch.Tensor:
    """Sample full (n,H,W) code grids; ``callback`` sees each partial grid."""
    for progress in sample(prior, n, temperature, top_k, top_p, seed, method, known=known):
        if callback is not None:
            callback(progress)
    return progress.codes

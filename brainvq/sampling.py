"""Sampling code grids from the gated PixelCNN, with temperature and top-k, observable as it fills in.

Two samplers share one interface and one source of randomness (a uniform number per position drawn up front
from ``seed`` and turned into a code by inverse CDF), so with the same seed they give identical codes:

* ``naive``: reruns the whole network on the whole grid for every position (O(H*W) full passes);
* ``fast``: caches activations (in the spirit of Ramachandran et al., 2017, "Fast Generation for
  Convolutional Autoregressive Models"). The vertical stack of row i depends only on rows < i, so it is
  computed once per row, for that row alone, from cached rows above. The horizontal stack then advances one
  position at a time from cached row buffers, so each step costs a few small matrix-vector products per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from brainvq.pixelcnn import GatedPixelCNN, gate

METHODS = ("fast", "naive")


@dataclass
class SampleProgress:
    """A partly filled grid: ``codes`` holds -1 where nothing has been sampled yet."""

    codes: torch.Tensor
    filled: int
    total: int

    @property
    def done(self) -> bool:
        return self.filled == self.total


def pick(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """(B,K) logits + (B,) uniforms -> (B,) codes. Temperature <= 1e-6 is greedy (argmax)."""
    if temperature <= 1e-6:
        return logits.argmax(-1)
    logits = logits.double() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    index = torch.searchsorted(cdf, (uniform.double() * cdf[..., -1]).unsqueeze(-1))
    return index.squeeze(-1).clamp_max(logits.shape[-1] - 1)


def default_settings(prior: GatedPixelCNN) -> dict:
    """The sampling settings chosen on validation for this prior (``"sampling"`` in its config.json), as keyword
    arguments of ``sample_codes``; temperature 1 and no truncation when the checkpoint has none."""
    return dict(getattr(prior, "meta", {}).get("sampling", {"temperature": 1.0}))


def _check(temperature: float, top_k: int | None, n: int, method: str) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be positive or None, got {top_k}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@torch.no_grad()
def sample(prior: GatedPixelCNN, n: int = 1, temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
           method: str = "fast", every: int | None = None) -> Iterator[SampleProgress]:
    """Yield the grid every ``every`` positions (default: once per row) and once more when it is full."""
    _check(temperature, top_k, n, method)
    prior.eval()
    size = prior.cfg.grid_size
    device = next(prior.parameters()).device
    uniforms = torch.rand(n, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    codes = torch.full((n, size, size), -1, dtype=torch.long, device=device)
    step = (_FastSampler(prior, codes) if method == "fast" else _NaiveSampler(prior, codes)).logits_at
    every = every or size
    for index in range(size * size):
        i, j = divmod(index, size)
        codes[:, i, j] = pick(step(i, j), uniforms[:, i, j].to(device), temperature, top_k)
        if (index + 1) % every == 0 or index + 1 == size * size:
            yield SampleProgress(codes.clone(), index + 1, size * size)


def sample_codes(prior: GatedPixelCNN, n: int = 1, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 0, method: str = "fast",
                 callback: Callable[[SampleProgress], None] | None = None) -> torch.Tensor:
    """Sample full (n,H,W) code grids; ``callback`` sees each partial grid."""
    for progress in sample(prior, n, temperature, top_k, seed, method):
        if callback is not None:
            callback(progress)
    return progress.codes


class _NaiveSampler:
    """The whole network on the whole grid for every position."""

    def __init__(self, prior: GatedPixelCNN, codes: torch.Tensor):
        self.prior, self.codes = prior, codes

    def logits_at(self, i: int, j: int) -> torch.Tensor:
        return self.prior(self.codes)[:, :, i, j]


class _FastSampler:
    """Per-row vertical stack and per-position horizontal stack over cached activations."""

    def __init__(self, prior: GatedPixelCNN, codes: torch.Tensor):
        self.prior, self.codes = prior, codes
        n, size = codes.shape[0], prior.cfg.grid_size
        self.size, self.row = size, -1
        self.x = prior.embed_codes(codes)                       # (B,E,H,W), zeros where unsampled
        pos = prior.pos
        # v_in[l] is the input grid of layer l's vertical stack; v_in[l+1] its output
        self.v = [self.x] + [self.x.new_zeros(n, prior.cfg.channels, size, size) for _ in prior.layers]
        self.h_pos = [(layer.h_pos(pos)[0] if pos is not None else None) for layer in prior.layers]
        self.v_pos = [(layer.v_pos(pos)[0] if pos is not None else None) for layer in prior.layers]
        self.pad = max(layer.h_pad()[0] for layer in prior.layers)
        # row buffers of each layer's horizontal-stack input, left-padded with zeros
        self.h_src = [self.x.new_zeros(n, layer.h_conv.in_channels, size + self.pad) for layer in prior.layers]
        self.links: list[torch.Tensor] = []
        self.h_weights = [layer.h_conv.weight.flatten(1) for layer in prior.layers]
        self.head = [m for m in prior.head if isinstance(m, torch.nn.Conv2d)]

    def _start_row(self, i: int) -> None:
        """Vertical stack for row i (it sees rows < i only), and each layer's link into the horizontal stack."""
        self.links = []
        for l, layer in enumerate(self.prior.layers):
            src = self.v[l]
            left, right, top, _ = layer.v_pad()
            if layer.first:
                rows = F.pad(src[:, :, max(0, i - top):i], (left, right, top - min(top, i), 0))
                v_pre = F.conv2d(rows, layer.v_conv.weight, layer.v_conv.bias)
            else:
                d = layer.dilation
                above = src[:, :, i - d:i - d + 1] if i >= d else torch.zeros_like(src[:, :, :1])
                rows = F.pad(torch.cat([above, src[:, :, i:i + 1]], 2), (left, right, 0, 0))
                v_pre = F.conv2d(rows, layer.v_conv.weight, layer.v_conv.bias, dilation=(1, d))
            link = layer.link(v_pre)[:, :, 0]
            if self.v_pos[l] is not None:
                v_pre = v_pre + self.v_pos[l][:, i:i + 1]
                link = link + self.h_pos[l][:, i]
            v_new = layer.v_out(gate(v_pre))[:, :, 0]
            self.v[l + 1][:, :, i] = v_new if layer.first else src[:, :, i] + v_new
            self.links.append(link)
            self.h_src[l].zero_()

    def logits_at(self, i: int, j: int) -> torch.Tensor:
        if i or j:  # the code sampled at the previous position enters the embedding grid
            pi, pj = divmod(i * self.size + j - 1, self.size)
            self.x[:, :, pi, pj] = self.prior.embed(self.codes[:, pi, pj])
        if i != self.row:
            self._start_row(i)
            self.row = i
        elif j > 0:
            self.h_src[0][:, :, self.pad + j - 1] = self.x[:, :, i, j - 1]
        h = None
        for l, layer in enumerate(self.prior.layers):
            col = self.pad + j
            if layer.first:
                window = self.h_src[0][:, :, col - layer.half:col]
            else:
                self.h_src[l][:, :, col] = F.relu(F.linear(h, layer.h_in.weight[:, :, 0, 0], layer.h_in.bias))
                d = layer.dilation
                window = self.h_src[l][:, :, col - d:col + 1:d]
            pre = F.linear(window.flatten(1), self.h_weights[l], layer.h_conv.bias) + self.links[l][:, :, j]
            update = F.linear(gate(pre), layer.h_out.weight[:, :, 0, 0], layer.h_out.bias)
            h = update if layer.first else h + update
        for conv in self.head:
            h = F.linear(F.relu(h), conv.weight[:, :, 0, 0], conv.bias)
        return h


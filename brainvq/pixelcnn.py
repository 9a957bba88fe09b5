"""Gated PixelCNN prior over the VQ-VAE's code grid (van den Oord et al., 2016), without a blind spot.

Layout, in order:
  * a type-A gated layer with a large kernel: the vertical stack sees the k//2 rows strictly above,
    the horizontal stack the k//2 codes strictly to the left;
  * gated residual blocks: 1x1 conv -> type-B masked conv (vertical 2x3 / horizontal 1x2, dilated) -> 1x1 conv,
    plus the additive skip. Dilations cycle 1, 2, 4, ... max_dilation; each block adds its dilation to the
    rows the vertical stack reaches (``PixelCNNConfig.rows_seen``). The default 10 layers (dilations 1, 2, 4, 8,
    16, 32, 1, 2, 4) reach 3 + 63 + 7 = 73 rows, so on the 64x64 grid every position sees every code above it
    (8 layers with dilations up to 8 reach 25). tests/test_pixelcnn.py measures this through gradients at full
    size; ``grow`` deepens a trained prior without changing what it computes;
  * two type-B 1x1 layers and an output layer of K logits per position.

Position awareness: a learned map P (pos_dim x H x W) is projected into every gate, so the net knows where in
the frame it stands (training slices are all centred).

Causality: vertical features at row i depend on codes in rows < i only; horizontal features at (i, j) on codes
(i, < j) plus the vertical features of row i. ``forward`` computes all positions at once (training);
``brainvq.sampling`` reuses the same weights position by position with cached activations.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from brainvq import checkpoint


@dataclass
class PixelCNNConfig:
    num_codes: int = 512        # K, from the VQ-VAE
    grid_size: int = 64         # the VQ-VAE's code grid is grid_size x grid_size
    channels: int = 48          # width of both stacks
    embed_dim: int = 48
    num_layers: int = 10        # gated layers including the type-A one
    first_kernel: int = 7       # type-A kernel: sees first_kernel//2 rows above / codes to the left
    max_dilation: int = 32      # dilations cycle 1, 2, 4, ... up to this
    pos_dim: int = 16           # 0 disables the positional map
    head_channels: int = 128

    @classmethod
    def from_dict(cls, arch: dict[str, Any]) -> "PixelCNNConfig":
        return cls(**{k: v for k, v in arch.items() if k in cls.__dataclass_fields__})

    def dilation(self, layer: int) -> int:
        """Dilation of gated layer ``layer`` (>= 1): 1, 2, 4, ... max_dilation, 1, 2, ..."""
        cycle = max(1, self.max_dilation.bit_length())
        return 2 ** ((layer - 1) % cycle)

    @property
    def rows_seen(self) -> int:
        """How many rows above its own the vertical stack reaches: a full grid needs grid_size - 1."""
        return self.first_kernel // 2 + sum(self.dilation(layer) for layer in range(1, self.num_layers))


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) over the two halves of the channel axis."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks. Layer 0 is type A (large kernel, excludes the current code),
    layers >= 1 are type-B residual blocks with dilation ``dilation``."""

    def __init__(self, cfg: PixelCNNConfig, index: int):
        super().__init__()
        c = cfg.channels
        self.first = index == 0
        if self.first:
            self.rows, self.half = cfg.first_kernel // 2, cfg.first_kernel // 2
            self.dilation = 1
            in_ch = cfg.embed_dim
            self.v_conv = nn.Conv2d(in_ch, 2 * c, (self.rows, 2 * self.half + 1))
            self.h_conv = nn.Conv2d(in_ch, 2 * c, (1, self.half))
        else:
            self.dilation = cfg.dilation(index)
            in_ch = c
            self.h_in = nn.Conv2d(c, c, 1)
            self.v_conv = nn.Conv2d(c, 2 * c, (2, 3), dilation=self.dilation)
            self.h_conv = nn.Conv2d(c, 2 * c, (1, 2), dilation=self.dilation)
        self.link = nn.Conv2d(2 * c, 2 * c, 1)
        self.v_out = nn.Conv2d(c, c, 1)
        self.h_out = nn.Conv2d(c, c, 1)
        self.v_pos = nn.Conv2d(cfg.pos_dim, 2 * c, 1, bias=False) if cfg.pos_dim else None
        self.h_pos = nn.Conv2d(cfg.pos_dim, 2 * c, 1, bias=False) if cfg.pos_dim else None

    def v_pad(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) padding that makes the vertical conv causal and size-preserving."""
        if self.first:
            return self.half, self.half, self.rows, 0   # then drop the last output row: rows strictly above
        d = self.dilation
        return d, d, d, 0

    def h_pad(self) -> tuple[int, int, int, int]:
        return (self.half, 0, 0, 0) if self.first else (self.dilation, 0, 0, 0)

    def forward(self, v: torch.Tensor, h: torch.Tensor, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = v.shape[-2:]
        v_pre = self.v_conv(F.pad(v, self.v_pad()))[..., :height, :]
        h_src = h if self.first else F.relu(self.h_in(h))
        h_pre = self.h_conv(F.pad(h_src, self.h_pad()))[..., :width] + self.link(v_pre)
        if pos is not None:
            v_pre = v_pre + self.v_pos(pos)
            h_pre = h_pre + self.h_pos(pos)
        v_new, h_new = self.v_out(gate(v_pre)), self.h_out(gate(h_pre))
        if self.first:
            return v_new, h_new
        return v + v_new, h + h_new


class GatedPixelCNN(nn.Module, checkpoint.HubModel):
    """Autoregressive prior p(code_ij | codes above and to the left), raster order."""

    kind, label, config_class = "pixelcnn", "PixelCNN prior", PixelCNNConfig

    def __init__(self, cfg: PixelCNNConfig | None = None):
        super().__init__()
        self.cfg = cfg or PixelCNNConfig()
        c, g = self.cfg.channels, self.cfg.grid_size
        self.embed = nn.Embedding(self.cfg.num_codes, self.cfg.embed_dim)
        self.pos = nn.Parameter(torch.randn(1, self.cfg.pos_dim, g, g) * 0.1) if self.cfg.pos_dim else None
        self.layers = nn.ModuleList(GatedLayer(self.cfg, i) for i in range(self.cfg.num_layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, self.cfg.head_channels, 1), nn.ReLU(),
                                  nn.Conv2d(self.cfg.head_channels, self.cfg.head_channels, 1), nn.ReLU(),
                                  nn.Conv2d(self.cfg.head_channels, self.cfg.num_codes, 1))

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B,H,W) codes -> (B,E,H,W); negative codes (not yet sampled) embed as zeros."""
        x = self.embed(codes.clamp_min(0)).permute(0, 3, 1, 2)
        return x * (codes >= 0).unsqueeze(1).to(x.dtype)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """(B,H,W) long codes -> (B,K,H,W) logits; logits at (i,j) see only codes before (i,j)."""
        if codes.shape[-2:] != (self.cfg.grid_size, self.cfg.grid_size):
            raise ValueError(f"codes have grid {tuple(codes.shape[-2:])}, this prior models "
                             f"{self.cfg.grid_size}x{self.cfg.grid_size}")
        x = self.embed_codes(codes)
        pos = self.pos.expand(len(codes), -1, -1, -1) if self.pos is not None else None
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h, pos)
        return self.head(h)

    def loss(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy in nats, and top-1 accuracy."""
        logits = self(codes)
        return F.cross_entropy(logits, codes), (logits.argmax(1) == codes).float().mean()

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: str | os.PathLike, vqvae_fingerprint: str, **meta: Any) -> Path:
        """save_pretrained, recording the fingerprint of the VQ-VAE whose codes this prior models."""
        return super().save(folder, vqvae_fingerprint=vqvae_fingerprint, **meta)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, vqvae: Any | None = None,
                        **kwargs: Any) -> "GatedPixelCNN":
        """HubModel.from_pretrained; with ``vqvae`` given, refuse a prior not trained on that VQ-VAE's codes."""
        prior = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if vqvae is not None:
            check_pairing(prior.meta, vqvae, pretrained_model_name_or_path)
        return prior


def code_nll(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B,K,H,W) logits and (B,H,W) codes -> (B,H,W) float32 negative log-likelihood of each code, in nats.
    The softmax runs over a contiguous last dimension: over NCHW channels, as F.cross_entropy does, it is
    about 7x slower on a CPU (19.6 vs 2.7 ms for one 64x64 grid of 512 codes: bench/demo_costs.py)."""
    log_p = logits.float().permute(0, 2, 3, 1).log_softmax(-1)
    return -log_p.gather(-1, codes.unsqueeze(-1)).squeeze(-1)


def grow(prior: GatedPixelCNN, cfg: PixelCNNConfig) -> GatedPixelCNN:
    """A deeper prior that computes exactly what ``prior`` computes (function-preserving growth, as in Net2Net).

    The old gated layers keep their order and dilations; each new layer starts with zero output convolutions,
    so its residual adds nothing until training finds a use for it. This lets a prior that reaches the whole
    grid start from a trained one that does not, which on two CPU cores saves most of its training.
    """
    same = ("num_codes", "grid_size", "channels", "embed_dim", "first_kernel", "pos_dim", "head_channels")
    differ = [f for f in same if getattr(prior.cfg, f) != getattr(cfg, f)]
    if differ:
        raise ValueError(f"can only grow a prior in depth and dilation; these differ: {', '.join(differ)}")
    grown = GatedPixelCNN(cfg)
    placed = {0: 0}     # new layer index -> old layer index, old layers matched in order by dilation
    new = 1
    for old, layer in enumerate(prior.layers[1:], start=1):
        while new < cfg.num_layers and grown.layers[new].dilation != layer.dilation:
            new += 1
        if new == cfg.num_layers:
            raise ValueError(f"the grown prior's dilations {[l.dilation for l in grown.layers[1:]]} do not hold "
                             f"the old ones {[l.dilation for l in prior.layers[1:]]} in order")
        placed[new] = old
        new += 1
    state = grown.state_dict()
    for name, value in prior.state_dict().items():
        if not name.startswith("layers."):
            state[name] = value
    for new, old in placed.items():
        for name, value in prior.layers[old].state_dict().items():
            state[f"layers.{new}.{name}"] = value
    for new in set(range(cfg.num_layers)) - set(placed):
        for name in ("v_out", "h_out"):
            for param in ("weight", "bias"):
                state[f"layers.{new}.{name}.{param}"].zero_()
    grown.load_state_dict(state)
    return grown


def check_pairing(prior_config: dict[str, Any], vqvae: Any, folder: str | os.PathLike) -> None:
    """A prior is only meaningful over the codes of the VQ-VAE it was trained on."""
    arch = prior_config["arch"]
    grid = vqvae.grid_size()
    if arch["num_codes"] != vqvae.cfg.num_codes or arch["grid_size"] != grid:
        raise checkpoint.CheckpointError(
            f"Prior {str(folder)!r} models K={arch['num_codes']} codes on a {arch['grid_size']}x{arch['grid_size']} grid, "
            f"but the VQ-VAE has K={vqvae.cfg.num_codes} on a {grid}x{grid} grid. Load the prior trained with this VQ-VAE.")
    expected = prior_config.get("vqvae_fingerprint")
    if expected != vqvae.fingerprint():
        raise checkpoint.CheckpointError(
            f"Prior {str(folder)!r} was trained on VQ-VAE {expected}, but the loaded VQ-VAE is {vqvae.fingerprint()}. "
            "Load the matching pair, or retrain the prior with train/train_pixelcnn.py on this VQ-VAE.")

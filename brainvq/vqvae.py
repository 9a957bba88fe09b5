"""VQ-VAE for 256x256 brain slices.

encoder: n stride-2 convs (each halves the image) -> residual blocks -> 1x1 conv to D channels
quantiser: K x D codebook, nearest neighbour (Euclidean), straight-through gradients, commitment loss,
           EMA codebook updates and restart of dead codes from encoder outputs
decoder: mirror of the encoder with transposed (upsampling) convolutions and a sigmoid output
loss:    (1 - SSIM) + l1_weight * L1 + commitment
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from brainvq import checkpoint
from brainvq.metrics import ssim


@dataclass
class VQVAEConfig:
    num_codes: int = 512          # K
    code_dim: int = 32            # D
    widths: tuple[int, ...] = (64, 128)  # channels after each halving; len(widths) = number of halvings
    num_res_blocks: int = 2
    res_width: int = 64
    commitment: float = 0.25
    ema_decay: float = 0.99
    dead_threshold: float = 1.0   # restart a code whose EMA count per batch falls below this
    l1_weight: float = 1.0

    @property
    def downsample(self) -> int:
        return 2 ** len(self.widths)

    @classmethod
    def from_dict(cls, arch: dict[str, Any]) -> "VQVAEConfig":
        known = {k: v for k, v in arch.items() if k in cls.__dataclass_fields__}
        if "widths" in known:
            known["widths"] = tuple(known["widths"])
        return cls(**known)


class ResidualBlock(nn.Module):
    """x + 1x1(relu(3x3(relu(x))))"""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 1
        for width in cfg.widths:
            layers += [nn.Conv2d(in_ch, width, 4, stride=2, padding=1), nn.ReLU()]
            in_ch = width
        layers.append(nn.Conv2d(in_ch, in_ch, 3, padding=1))
        layers += [ResidualBlock(in_ch, cfg.res_width) for _ in range(cfg.num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(in_ch, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = list(cfg.widths)
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, widths[-1], 3, padding=1)]
        layers += [ResidualBlock(widths[-1], cfg.res_width) for _ in range(cfg.num_res_blocks)]
        layers.append(nn.ReLU())
        for width, out in zip(widths[::-1], widths[-2::-1] + [1]):
            layers.append(nn.ConvTranspose2d(width, out, 4, stride=2, padding=1))
            if out != 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(z))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (identity in a single process)."""
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour K x D codebook kept alive by EMA updates and dead-code restarts.

    Under torch.distributed the EMA statistics are all-reduced over the global batch and initial / restarted
    codes are drawn from the global batch (``_random_rows``), so every rank holds the same codebook, and the
    same codebook as one process fed the whole global batch.
    """

    def __init__(self, num_codes: int, code_dim: int, decay: float = 0.99, commitment: float = 0.25,
                 dead_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.num_codes, self.code_dim = num_codes, code_dim
        self.decay, self.commitment, self.dead_threshold, self.eps = decay, commitment, dead_threshold, eps
        self.register_buffer("codebook", torch.randn(num_codes, code_dim) * 0.1)
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.tensor(False))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the closest code (Euclidean) for each row of a (N, D) tensor."""
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t()
                     + self.codebook.pow(2).sum(1)[None])
        return distances.argmin(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B,H,W) code indices -> (B,D,H,W) code vectors."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _random_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` rows drawn uniformly, with replacement, from the encoder outputs of the *global* batch.

        The indices come from the CPU RNG (which ``--resume`` restores) and range over the global batch: the
        ranks' rows in rank order, which the data sampler makes the single-process batch row for row. With
        every rank seeded alike this is the draw one process would make; rank 0's draw is broadcast anyway so
        the ranks cannot disagree. Each row is then summed from the one rank that holds it (all others add
        exact zeros): n x D floats travel, not the whole batch, and every rank gets the same rows bit for bit.
        """
        if not _distributed():
            return flat[torch.randint(0, flat.shape[0], (n,)).to(flat.device)].clone()
        sizes = [torch.zeros(1, dtype=torch.long, device=flat.device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([flat.shape[0]], device=flat.device))
        sizes_list = [int(size) for size in sizes]
        rank = dist.get_rank()
        index = torch.randint(0, sum(sizes_list), (n,)).to(flat.device)
        dist.broadcast(index, src=0)
        local = index - sum(sizes_list[:rank])
        mine = (local >= 0) & (local < flat.shape[0])
        rows = flat.new_zeros(n, flat.shape[1])
        rows[mine] = flat[local[mine]]
        return _all_reduce(rows)

    @torch.no_grad()
    def initialize(self, flat: torch.Tensor) -> None:
        """Start the codebook from random encoder outputs (the first training batch)."""
        self.codebook.copy_(self._random_rows(flat, self.num_codes))
        self.ema_sum.copy_(self.codebook)
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, flat: torch.Tensor, codes: torch.Tensor) -> int:
        """One EMA step on the codebook, then restart dead codes; returns how many were restarted.

        Under torch.distributed counts and sums are all-reduced first, so the EMA sees the global batch; every
        rank then computes the same codebook and the same ``dead`` mask, hence makes the same collective calls.
        """
        count = _all_reduce(torch.bincount(codes, minlength=self.num_codes).to(flat.dtype))
        total = _all_reduce(flat.new_zeros(self.num_codes, self.code_dim).index_add_(0, codes, flat))
        self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(total, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.num_codes * self.eps) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        dead = self.ema_count < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead:
            fresh = self._random_rows(flat, n_dead)
            self.codebook[dead] = fresh
            self.ema_sum[dead] = fresh
            self.ema_count[dead] = 1.0 if self.dead_threshold <= 1.0 else self.dead_threshold
        return n_dead

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B,D,H,W) -> (straight-through quantized z, codes (B,H,W), commitment loss)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training and not bool(self.initialized):
            self.initialize(flat.detach().float())
        with torch.autocast(z.device.type, enabled=False):  # distances in fp32 even under bf16 autocast
            codes = self.nearest(flat.detach().float())
        if self.training:
            self.update(flat.detach().float(), codes)
        quantized = self.lookup(codes.view(b, h, w)).to(z.dtype)
        commitment = self.commitment * F.mse_loss(z, quantized.detach())
        return z + (quantized - z).detach(), codes.view(b, h, w), commitment


@dataclass
class VQVAEOutput:
    recon: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


class VQVAE(nn.Module, checkpoint.HubModel):
    """Encoder, vector quantiser and decoder; ``forward`` returns reconstruction, losses and codes."""

    kind, label, config_class = "vqvae", "VQ-VAE", VQVAEConfig

    def __init__(self, cfg: VQVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg or VQVAEConfig()
        self.encoder = Encoder(self.cfg)
        self.quantizer = VectorQuantizer(self.cfg.num_codes, self.cfg.code_dim, self.cfg.ema_decay,
                                         self.cfg.commitment, self.cfg.dead_threshold)
        self.decoder = Decoder(self.cfg)

    def grid_size(self, image_size: int = 256) -> int:
        return image_size // self.cfg.downsample

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B,1,H,W) images in [0,1] -> (B,H/f,W/f) long code indices."""
        z = self.encoder(images)
        b, d, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B,h,w) code indices -> (B,1,h*f,w*f) images in [0,1]."""
        return self.decoder(self.quantizer.lookup(codes))

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        quantized, codes, commitment = self.quantizer(self.encoder(images))
        recon = self.decoder(quantized)
        ssim_loss = 1 - ssim(recon.float(), images.float())
        l1 = F.l1_loss(recon, images)
        loss = ssim_loss + self.cfg.l1_weight * l1 + commitment
        return VQVAEOutput(recon, codes, loss, {"ssim_loss": ssim_loss.detach(), "l1": l1.detach(),
                                                "commitment": commitment.detach()})

    # ------------------------------------------------------------------ checkpoints

    def fingerprint(self) -> str:
        """Hash of the codebook: a prior trained on these codes must be used with this VQ-VAE."""
        return hashlib.sha256(self.quantizer.codebook.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]

    def checkpoint_config(self) -> dict[str, Any]:
        """config.json records the codebook's fingerprint, which a prior trained on these codes must match."""
        return {**super().checkpoint_config(), "fingerprint": self.fingerprint()}


@torch.no_grad()
def encode_array(model: VQVAE, images, batch_size: int = 32, progress: str | None = None) -> torch.Tensor:
    """Encode a uint8 (N,256,256) array (e.g. a memory-mapped split) to (N,h,w) long codes; ``progress``
    names a tqdm bar over the slices."""
    from tqdm import tqdm

    from brainvq.data import iter_batches

    device = next(model.parameters()).device
    model.eval()
    codes = []
    with tqdm(total=len(images), desc=progress, unit="slice", disable=progress is None, leave=False) as bar:
        for batch in iter_batches(images, batch_size):
            codes.append(model.encode(batch.to(device)).cpu())
            bar.update(len(batch))
    return torch.cat(codes)

"""Pictures shared by the training scripts, the evaluator and the app: code grids and triptychs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from brainvq.io import atomic_write_bytes


def colorize_codes(codes: torch.Tensor | np.ndarray, num_codes: int, size: int | None = None,
                   filled: np.ndarray | None = None) -> np.ndarray:
    """(h,w) code indices -> (h,w,3) uint8 RGB through a fixed colour map; unfilled cells are dark grey.

    With ``size`` the grid is enlarged to size x size with nearest-neighbour blocks, so codes stay crisp.
    """
    from matplotlib import colormaps

    codes = np.asarray(codes.cpu() if torch.is_tensor(codes) else codes)
    rgb = (colormaps["nipy_spectral"](codes / max(num_codes - 1, 1))[..., :3] * 255).astype(np.uint8)
    if filled is not None:
        rgb[~filled] = 40
    if size is not None and size != codes.shape[0]:
        rep = size // codes.shape[0]
        rgb = rgb.repeat(rep, 0).repeat(rep, 1)
    return rgb


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(1,H,W) or (H,W) float image in [0,1] -> (H,W) uint8."""
    return (image.detach().cpu().float().squeeze().clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def save_triptych_figure(originals: torch.Tensor, codes: torch.Tensor, recons: torch.Tensor, scores: list[float],
                         num_codes: int, path: Path, title: str) -> None:
    """Rows of original | code grid | reconstruction (with SSIM), like the seed's results figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(originals)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for row in range(n):
        panels = [(to_uint8(originals[row]), "original"), (colorize_codes(codes[row], num_codes), "code grid"),
                  (to_uint8(recons[row]), f"reconstruction (SSIM {scores[row]:.3f})")]
        for ax, (image, label) in zip(axes[row], panels):
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def save_gallery(images: torch.Tensor, path: Path, columns: int = 4, title: str = "") -> None:
    """A grid of grayscale images as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, images):
        ax.imshow(to_uint8(image), cmap="gray", vmin=0, vmax=255)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)

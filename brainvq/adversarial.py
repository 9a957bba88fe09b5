"""The critic that teaches the VQ-VAE's decoder real texture (train/finetune_decoder.py).

An L1 + SSIM decoder averages over what a code leaves open, so its slices are smoother than real ones, which caps
the realism of every sample. As in VQGAN (Esser et al., 2021), a patch critic pushes the decoder towards real
texture:

* ``PatchCritic``: strided convolutions scoring overlapping patches (PatchGAN, Isola et al., 2017);
* ``hinge_critic_loss`` and ``decoder_adversarial_loss``: the hinge objectives of both players;
* ``adaptive_weight``: the adversarial term's weight that gives its gradient at the decoder's last layer the norm
  of the reconstruction loss's gradient there, so one setting works whatever the loss scales.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


class PatchCritic(nn.Module):
    """(B,1,H,W) images in [0,1] -> (B,1,H/8-2,W/8-2) realism scores of overlapping patches: each score's
    convolutions see a 70x70 patch (its GroupNorm statistics come from the whole image)."""

    def __init__(self, width: int = 64, halvings: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for _ in range(halvings - 1):
            layers += [nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), nn.GroupNorm(8, 2 * channels),
                       nn.LeakyReLU(0.2)]
            channels *= 2
        layers += [nn.Conv2d(channels, channels, 4, padding=1), nn.GroupNorm(8, channels), nn.LeakyReLU(0.2),
                   nn.Conv2d(channels, 1, 4, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)


def hinge_critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss; ``fake`` is detached, so this loss trains the critic only."""
    return F.relu(1 - critic(real)).mean() + F.relu(1 + critic(fake.detach())).mean()


def decoder_adversarial_loss(critic: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """The decoder's hinge loss, through a frozen copy of the critic's weights: it trains the decoder only, so one
    backward pass of the sum of both players' losses gives each its own gradient."""
    frozen = {name: tensor.detach() for name, tensor in critic.named_parameters()}
    frozen.update(dict(critic.named_buffers()))
    return -functional_call(critic, frozen, (fake,)).mean()


def adaptive_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor,
                    scale: float, limit: float = 1e4) -> torch.Tensor:
    """``scale`` x |grad reconstruction| / |grad adversarial| at ``last_layer`` (the decoder's output weight), detached."""
    rec_grad, = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    adv_grad, = torch.autograd.grad(adversarial, last_layer, retain_graph=True)
    return (scale * rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0, limit).detach()

"""The decoder fine-tune against a patch critic: each player's loss trains only that player, the codes keep their
meaning (a prior of the source VQ-VAE still loads), and --resume repeats the uninterrupted run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from brainvq.adversarial import PatchCritic, adaptive_weight, decoder_adversarial_loss, hinge_critic_loss
from brainvq.checkpoint import read_tensors
from brainvq.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.vqvae import VQVAE, VQVAEConfig
from helpers import train_script

TINY = ["--batch-size", "4", "--max-steps", "2", "--crop", "64", "--device", "cpu"]


def test_each_players_loss_trains_only_that_player():
    torch.manual_seed(0)
    critic, decoder = PatchCritic(width=8), torch.nn.Conv2d(1, 1, 3, padding=1)
    real = torch.rand(2, 1, 64, 64)
    fake = torch.sigmoid(decoder(torch.rand(2, 1, 64, 64)))
    decoder_adversarial_loss(critic, fake).backward(retain_graph=True)
    assert all(p.grad is None for p in critic.parameters()) and decoder.weight.grad.abs().sum() > 0
    decoder.zero_grad()
    hinge_critic_loss(critic, real, fake).backward()
    assert decoder.weight.grad is None or not decoder.weight.grad.any()
    assert all(p.grad is not None for p in critic.parameters())


def test_the_critics_convolutions_see_70_pixel_patches_at_the_shipped_size():
    critic = PatchCritic()
    image = torch.rand(1, 1, 256, 256, requires_grad=True)
    assert critic(image).shape == (1, 1, 256 // 8 - 2, 256 // 8 - 2)
    convolutions = torch.nn.Sequential(*(m for m in critic.net if not isinstance(m, torch.nn.GroupNorm)))
    convolutions(image * 2 - 1)[0, 0, 15, 15].backward()   # GroupNorm's statistics span the image: left out
    rows, cols = (image.grad[0, 0].abs().sum(dim) > 0 for dim in (1, 0))
    assert int(rows.sum()) == int(cols.sum()) == 70


def test_adaptive_weight_matches_the_gradient_norms():
    layer = torch.nn.Linear(3, 1)
    x = torch.ones(1, 3)
    small, large = layer(x).sum(), 10 * layer(x).sum()       # gradients at layer.weight: x and 10 x
    assert float(adaptive_weight(small, large, layer.weight, scale=0.5)) == pytest.approx(0.05, rel=1e-3)


def save_tiny_vqvae(folder: Path) -> VQVAE:
    torch.manual_seed(0)
    vqvae = VQVAE(VQVAEConfig(num_codes=16, code_dim=8, widths=(8, 8), res_width=8, num_res_blocks=1))
    vqvae.quantizer.codebook.normal_()
    vqvae.save(folder)
    return vqvae


def test_finetune_changes_only_the_decoder_and_priors_still_fit(tmp_path, folder_tree, capsys):
    source = save_tiny_vqvae(tmp_path / "vqvae")
    prior = GatedPixelCNN(PixelCNNConfig(num_codes=16, grid_size=64, channels=8, embed_dim=8, num_layers=1,
                                         first_kernel=3, max_dilation=1, pos_dim=0, head_channels=8))
    prior.save(tmp_path / "prior", source.fingerprint())
    train_script("finetune_decoder").main(["--vqvae", str(tmp_path / "vqvae"), "--data-dir", str(folder_tree),
                            "--out", str(tmp_path / "run"), "--epochs", "1", *TINY])
    progress = capsys.readouterr().err
    assert "epoch 1/1:   0%|          | 0/2 [" in progress and "validation:   0%" in progress
    tuned = VQVAE.from_pretrained(tmp_path / "run" / "best")
    assert tuned.fingerprint() == source.fingerprint()
    GatedPixelCNN.from_pretrained(tmp_path / "prior", vqvae=tuned)       # the prior's codes mean what they meant
    before, after = source.state_dict(), tuned.state_dict()
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same != name.startswith("decoder."), f"{name} {'unchanged' if same else 'changed'}"
    metrics = tuned.meta["metrics"]
    assert set(metrics) == {"val_ssim", "val_laplacian_ratio", "val_intensity_w1", "epoch"}
    assert tuned.meta["decoder_finetune"]["from"] == str(tmp_path / "vqvae")


def test_resume_repeats_the_uninterrupted_run(tmp_path, folder_tree, capsys):
    save_tiny_vqvae(tmp_path / "vqvae")
    common = ["--vqvae", str(tmp_path / "vqvae"), "--data-dir", str(folder_tree), *TINY]
    script = train_script("finetune_decoder")
    script.main([*common, "--out", str(tmp_path / "whole"), "--epochs", "2"])
    script.main([*common, "--out", str(tmp_path / "cut"), "--epochs", "1"])   # epoch 1's rate is --lr at any --epochs
    script.main([*common, "--out", str(tmp_path / "cut"), "--epochs", "2", "--resume"])
    assert "resumed from" in capsys.readouterr().out
    whole, cut = (read_tensors(tmp_path / run / "last" / "model.safetensors") for run in ("whole", "cut"))
    assert whole.keys() == cut.keys() and any(name.startswith("critic.") for name in whole)
    for name, tensor in whole.items():
        assert torch.equal(cut[name], tensor), f"{name} differs after resuming"

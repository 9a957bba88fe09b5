"""The gated PixelCNN prior and its samplers, on tiny real models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from brainvq.checkpoint import CheckpointError
from brainvq.pixelcnn import GatedPixelCNN, PixelCNNConfig, grow
from brainvq.sampling import pick, sample, sample_codes
from brainvq.vqvae import VQVAE, VQVAEConfig

TINY = dict(num_codes=7, grid_size=8, channels=8, embed_dim=6, num_layers=5, max_dilation=4, pos_dim=3,
            head_channels=8)


def tiny_prior(seed: int = 0, **overrides) -> GatedPixelCNN:
    """A tiny prior with large random weights, so every connection carries signal (float64 for exact tests)."""
    torch.manual_seed(seed)
    model = GatedPixelCNN(PixelCNNConfig(**{**TINY, **overrides})).double()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.5)
    return model.eval()


def embedded_pass(model: GatedPixelCNN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes embedded as a leaf tensor x, then both stacks and the head: (x, vertical, horizontal, logits),
    so that gradients measure what each output depends on."""
    size = model.cfg.grid_size
    x = model.embed_codes(torch.randint(0, model.cfg.num_codes, (1, size, size))).detach().requires_grad_(True)
    v = h = x
    for layer in model.layers:
        v, h = layer(v, h, model.pos)
    return x, v, h, model.head(h)


def dependencies(model: GatedPixelCNN) -> torch.Tensor:
    """dep[i, j, a, b]: does the logit at (i, j) depend on the input at (a, b)? (via input gradients)"""
    size = model.cfg.grid_size
    x, _, _, logits = embedded_pass(model)
    dep = torch.zeros(size, size, size, size, dtype=torch.bool)
    for i in range(size):
        for j in range(size):
            grad, = torch.autograd.grad(logits[0, :, i, j].sum(), x, retain_graph=True)
            dep[i, j] = grad[0].abs().sum(0) > 0
    return dep


@pytest.mark.parametrize("overrides", [{}, {"pos_dim": 0, "max_dilation": 1}, {"first_kernel": 5}])
def test_masks_are_causal_and_have_no_blind_spot(overrides):
    model = tiny_prior(**overrides)
    dep = dependencies(model)
    size = model.cfg.grid_size
    for i in range(size):
        for j in range(size):
            earlier = torch.zeros(size, size, dtype=torch.bool)
            earlier[:i] = True
            earlier[i, :j] = True
            assert not (dep[i, j] & ~earlier).any(), f"logit ({i},{j}) sees a later or the current position"
            assert (dep[i, j] | ~earlier).all(), f"logit ({i},{j}) misses an earlier position (blind spot)"


def test_each_stack_is_causal_on_its_own():
    """Vertical features of row i see rows < i only; horizontal features of (i, j) see (i, < j) plus rows above."""
    model = tiny_prior()
    size = model.cfg.grid_size
    x, v, h, _ = embedded_pass(model)
    for i in range(size):
        grad, = torch.autograd.grad(v[0, :, i].sum(), x, retain_graph=True)
        assert grad[0, :, i:].abs().sum() == 0, f"vertical stack row {i} sees its own row or below"
    for j in range(size):
        grad, = torch.autograd.grad(h[0, :, 3, j].sum(), x, retain_graph=True)
        assert grad[0, :, 3, j:].abs().sum() == 0 and grad[0, :, 4:].abs().sum() == 0


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 3), (0.0, None)])
def test_naive_and_fast_samplers_give_identical_codes(temperature, top_k):
    model = tiny_prior()
    naive = sample_codes(model, n=3, temperature=temperature, top_k=top_k, seed=1, method="naive")
    fast = sample_codes(model, n=3, temperature=temperature, top_k=top_k, seed=1, method="fast")
    assert torch.equal(naive, fast)


def test_samplers_agree_in_float32_with_every_feature_on():
    """The shipped prior runs in float32: the cached sampler must still reproduce the naive one exactly."""
    torch.manual_seed(0)
    model = GatedPixelCNN(PixelCNNConfig(num_codes=16, grid_size=16, channels=8, embed_dim=8, num_layers=5,
                                         max_dilation=8, pos_dim=2, head_channels=8)).eval()
    fast = sample_codes(model, n=2, seed=3)
    assert torch.equal(fast, sample_codes(model, n=2, seed=3, method="naive"))
    assert fast.min() >= 0 and fast.max() < 16


def test_temperature_to_zero_gives_the_argmax():
    logits = torch.randn(5, 11)
    uniform = torch.rand(5)
    assert torch.equal(pick(logits, uniform, 1e-9, None), logits.argmax(-1))
    assert torch.equal(pick(logits * 50, uniform, 1e-3, None), logits.argmax(-1))  # a tiny but non-zero T
    model = tiny_prior()
    greedy = sample_codes(model, n=2, temperature=0.0, seed=0)
    assert torch.equal(greedy, sample_codes(model, n=2, temperature=0.0, seed=123))  # no randomness left


def test_top_k_limits_the_choice():
    logits = torch.tensor([[5.0, 4.0, -1.0, -2.0]])
    picks = {int(pick(logits, torch.tensor([u]), 1.0, 2)) for u in torch.linspace(0, 0.999, 50)}
    assert picks == {0, 1}


def test_progress_streams_partial_grids():
    model = tiny_prior()
    frames = list(sample(model, n=2, seed=0, every=5))
    assert len(frames) == 13  # 64 positions, one frame every 5, plus the last
    assert [f.filled for f in frames][:3] == [5, 10, 15] and frames[-1].done
    assert (frames[0].codes == -1).sum() == 2 * (64 - 5)
    assert (frames[-1].codes >= 0).all()


def test_bad_sampling_arguments_are_refused():
    model = tiny_prior()
    for kwargs in ({"temperature": -1}, {"top_k": -2}, {"n": 0}, {"method": "magic"}):
        with pytest.raises(ValueError):
            next(sample(model, **kwargs))


def test_a_tiny_prior_learns_a_simple_code_distribution():
    """Grids whose rows alternate between two codes, with the phase chosen at random: after training the
    prior predicts every code but the first one almost perfectly."""
    torch.manual_seed(0)
    cfg = PixelCNNConfig(num_codes=4, grid_size=8, channels=16, embed_dim=8, num_layers=3, max_dilation=2,
                         pos_dim=2, head_channels=16)
    model = GatedPixelCNN(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def batch(n: int) -> torch.Tensor:
        phase = torch.randint(0, 2, (n, 1, 1))
        rows = torch.arange(8).view(1, 8, 1)
        return ((rows + phase) % 2 * 3).expand(n, 8, 8).contiguous()  # codes 0 and 3 in alternating rows

    with torch.no_grad():
        start, _ = model.loss(batch(32))
    for _ in range(150):
        nll, _ = model.loss(batch(32))
        optimizer.zero_grad()
        nll.backward()
        optimizer.step()
    with torch.no_grad():
        end, accuracy = model.loss(batch(64))
    assert float(end) < 0.05 * float(start)
    assert float(accuracy) > 0.97
    samples = sample_codes(model.eval(), n=4, seed=0)
    for grid in samples:
        assert set(grid.unique().tolist()) <= {0, 3}
        assert (grid[1:] != grid[:-1]).all()  # the learned rule holds in samples


def tiny_vqvae(seed: int) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(VQVAEConfig(num_codes=7, code_dim=4, widths=(4, 4, 4, 4, 4), res_width=4, num_res_blocks=1))


def test_save_then_load_round_trips(tmp_path):
    vqvae = tiny_vqvae(0)  # 256 / 32 = an 8x8 grid, like TINY
    model = tiny_prior().float()
    model.save(tmp_path / "prior", vqvae.fingerprint(), metrics={"val_bits_per_code": 1.0})
    loaded = GatedPixelCNN.from_pretrained(tmp_path / "prior", vqvae=vqvae)
    codes = torch.randint(0, 7, (2, 8, 8))
    assert torch.equal(model(codes), loaded(codes))
    assert loaded.meta["metrics"]["val_bits_per_code"] == 1.0
    assert torch.equal(sample_codes(model, n=2, seed=5), sample_codes(loaded, n=2, seed=5))


def test_a_prior_is_refused_with_another_vqvae(tmp_path):
    vqvae, other = tiny_vqvae(0), tiny_vqvae(1)
    tiny_prior().float().save(tmp_path / "prior", vqvae.fingerprint())
    with pytest.raises(CheckpointError, match="trained on VQ-VAE"):
        GatedPixelCNN.from_pretrained(tmp_path / "prior", vqvae=other)
    bigger = VQVAE(VQVAEConfig(num_codes=9, code_dim=4, widths=(4, 4, 4, 4, 4), res_width=4, num_res_blocks=1))
    with pytest.raises(CheckpointError, match="K=7 codes"):
        GatedPixelCNN.from_pretrained(tmp_path / "prior", vqvae=bigger)


def test_wrong_grid_is_refused():
    with pytest.raises(ValueError, match="grid"):
        tiny_prior()(torch.zeros(1, 4, 4, dtype=torch.long))


def test_rows_seen_counts_the_vertical_reach():
    assert PixelCNNConfig(num_layers=8, max_dilation=8).rows_seen == 3 + (1 + 2 + 4 + 8) + (1 + 2 + 4)
    assert PixelCNNConfig(num_layers=12, max_dilation=32).rows_seen == 3 + 63 + 31


def shipped_config() -> PixelCNNConfig:
    from brainvq.checkpoint import read_config

    return PixelCNNConfig.from_dict(read_config(Path(__file__).resolve().parents[1] / "checkpoints/pixelcnn")["arch"])


@pytest.mark.parametrize("config", [
    pytest.param(shipped_config, id="shipped"),
    pytest.param(PixelCNNConfig, id="default")])
def test_the_full_size_configuration_sees_the_whole_grid_above(config):
    """At full size (64x64 grid, K=512; the shipped checkpoint's arch and the default one), a logit on the last
    row depends on every position of every earlier row, and on nothing at or after itself: input gradients."""
    torch.manual_seed(0)
    model = GatedPixelCNN(config()).double().eval()
    size = model.cfg.grid_size
    assert model.cfg.rows_seen >= size - 1
    x, _, _, logits = embedded_pass(model)
    for j in (0, size // 2, size - 1):
        grad, = torch.autograd.grad(logits[0, :, size - 1, j].sum(), x, retain_graph=True)
        seen = grad[0].abs().sum(0) > 0
        assert seen[:size - 1].all(), f"logit ({size - 1},{j}) misses positions in rows {sorted(set(torch.nonzero(~seen[:size - 1])[:, 0].tolist()))}"
        assert seen[size - 1, :j].all() and not seen[size - 1, j:].any()


def test_growing_a_prior_keeps_what_it_computes():
    """pixelcnn.grow at the shipped sizes (8 layers, dilations to 8 -> 10 layers, dilations to 32): the grown
    prior gives the old logits exactly, and reaches the whole grid once trained."""
    torch.manual_seed(0)
    old = GatedPixelCNN(PixelCNNConfig(num_layers=8, max_dilation=8)).eval()
    for param in old.parameters():  # trained-looking weights: nothing left at its zero initialisation
        param.data.add_(0.01 * torch.randn_like(param))
    cfg = PixelCNNConfig(num_layers=10, max_dilation=32)
    grown = grow(old, cfg).eval()
    assert [layer.dilation for layer in grown.layers] == [1, 1, 2, 4, 8, 16, 32, 1, 2, 4]
    assert old.cfg.rows_seen == 25 and cfg.rows_seen == 73
    codes = torch.randint(0, cfg.num_codes, (2, cfg.grid_size, cfg.grid_size))
    with torch.no_grad():
        assert torch.equal(grown(codes), old(codes))


def test_growing_refuses_a_change_of_width_or_a_dilation_order_it_cannot_hold():
    old = GatedPixelCNN(PixelCNNConfig(grid_size=8, num_codes=16, channels=8, embed_dim=8, num_layers=4,
                                       max_dilation=4, head_channels=8))
    with pytest.raises(ValueError, match="channels"):
        grow(old, PixelCNNConfig(**{**old.cfg.__dict__, "channels": 16}))
    with pytest.raises(ValueError, match="do not hold"):
        grow(old, PixelCNNConfig(**{**old.cfg.__dict__, "num_layers": 4, "max_dilation": 1}))


def test_in_area_bits_and_subsets_are_what_they_say():
    """evaluate_prior's in-area figures are the mean NLL and the train-histogram cross-entropy over exactly the
    masked positions, and a named subset gets the same figures as scoring that subset alone."""
    from brainvq.evaluate import evaluate_prior
    from brainvq.metrics import nats_to_bits
    from brainvq.pixelcnn import code_nll

    model = tiny_prior()
    generator = torch.Generator().manual_seed(0)
    test_codes, train_codes = (torch.randint(0, 7, (n, 8, 8), generator=generator) for n in (6, 10))
    test_area, train_area = (torch.rand(n, 8, 8, generator=generator) < 0.5 for n in (6, 10))
    result = evaluate_prior(model, test_codes, train_codes, test_area, train_area, batch_size=4,
                            subsets={"even": [0, 2, 4]})
    with torch.no_grad():
        per_code = code_nll(model(test_codes), test_codes)
    assert result["bits_per_code_in_brain"] == pytest.approx(nats_to_bits(float(per_code[test_area].mean())))
    counts = torch.bincount(train_codes[train_area], minlength=7).double() + 1
    unigram = nats_to_bits(float(-(counts / counts.sum()).log()[test_codes[test_area]].mean()))
    assert result["unigram_bits_per_code_in_brain"] == pytest.approx(unigram)
    alone = evaluate_prior(model, test_codes[::2], train_codes, test_area[::2], train_area)
    assert result["even"] == pytest.approx(alone)

"""The VQ-VAE, its quantiser, its checkpoints and its training script, on tiny real models (no mocks)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from brainvq import checkpoint, training
from brainvq.checkpoint import CheckpointError
from brainvq.metrics import ssim
from brainvq.training import write_snapshot
from brainvq.vqvae import VQVAE, VectorQuantizer, VQVAEConfig
from helpers import train_script

TINY = dict(num_codes=16, code_dim=8, widths=(8, 16), res_width=8, num_res_blocks=1)


def tiny(**overrides) -> VQVAE:
    return VQVAE(VQVAEConfig(**{**TINY, **overrides}))


def blobs(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(n,1,size,size) synthetic slices in [0,1]: a dim background, a bright ellipse and a brighter core."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0.38, 0.62, 2) * size
        ry, rx = rng.uniform(0.19, 0.34, 2) * size
        radius = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2
        out[i, 0] = 0.1 + 0.6 * (radius <= 1) + 0.2 * (radius <= 0.25)
    return torch.from_numpy(out)


def trained_tiny(steps: int = 5, seed: int = 0) -> VQVAE:
    """A tiny model after a few Adam steps, so the codebook is initialised and EMA statistics are non-trivial."""
    torch.manual_seed(seed)
    model = tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = blobs(4, seed=seed)
    for _ in range(steps):
        out = model(x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return model.eval()


# ----------------------------------------------------------------------------- learning


def test_tiny_model_overfits_a_few_slices():
    torch.manual_seed(0)
    model = tiny()
    x = blobs(4)
    model.eval()
    with torch.no_grad():
        start = float(ssim(model(x).recon, x))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        out = model(x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    model.eval()
    with torch.no_grad():
        end = float(ssim(model.decode(model.encode(x)), x))
    assert end > start + 0.35, (start, end)
    assert end > 0.7, (start, end)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


def test_gradients_reach_the_encoder_through_the_quantiser():
    # commitment=0 removes the only loss term that reaches the encoder directly; what is left must go
    # through the straight-through estimator of the quantiser.
    torch.manual_seed(0)
    model = tiny(commitment=0.0)
    out = model(blobs(2))
    assert float(out.losses["commitment"]) == 0.0
    out.loss.backward()
    for name, param in model.encoder.named_parameters():
        assert param.grad is not None, name
        assert float(param.grad.abs().sum()) > 0, name


def test_straight_through_passes_the_gradient_unchanged():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, commitment=0.0).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantized, codes, commitment = vq(z)
    weights = torch.randn_like(quantized)
    (quantized * weights).sum().backward()
    assert torch.allclose(z.grad, weights)  # d(quantized)/dz is the identity
    # the forward value is the chosen code vector
    assert torch.allclose(quantized.detach(), vq.lookup(codes))


def test_quantiser_picks_the_nearest_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8)
    flat = torch.randn(50, 8)
    expected = torch.cdist(flat, vq.codebook).argmin(1)
    assert torch.equal(vq.nearest(flat), expected)


# ----------------------------------------------------------------------------- EMA codebook


def _ready_quantizer(num_codes: int, code_dim: int, decay: float, dead_threshold: float) -> VectorQuantizer:
    vq = VectorQuantizer(num_codes, code_dim, decay=decay, dead_threshold=dead_threshold)
    vq.initialized.fill_(True)
    vq.codebook.copy_(torch.arange(num_codes * code_dim, dtype=torch.float32).view(num_codes, code_dim))
    vq.ema_sum.copy_(vq.codebook)
    vq.ema_count.fill_(1.0)
    return vq


def test_ema_step_matches_hand_computation():
    # K=2, D=2, decay 0.5. Code 0 sits at (0,1) and gets (2,2) and (4,4) assigned; code 1 at (2,3) gets (10,0).
    vq = _ready_quantizer(2, 2, decay=0.5, dead_threshold=0.0)
    flat = torch.tensor([[2.0, 2.0], [4.0, 4.0], [10.0, 0.0]])
    codes = torch.tensor([0, 0, 1])
    assert vq.update(flat, codes) == 0
    # counts: 0.5*1 + 0.5*2 = 1.5 and 0.5*1 + 0.5*1 = 1.0; sums: 0.5*(0,1)+0.5*(6,6) and 0.5*(2,3)+0.5*(10,0)
    assert torch.allclose(vq.ema_count, torch.tensor([1.5, 1.0]))
    assert torch.allclose(vq.ema_sum, torch.tensor([[3.0, 3.5], [6.0, 1.5]]))
    # Laplace smoothing: count_k -> (count_k + eps) / (n + K eps) * n with n = 2.5
    eps, n = vq.eps, 2.5
    smoothed = torch.tensor([(1.5 + eps) / (n + 2 * eps) * n, (1.0 + eps) / (n + 2 * eps) * n])
    expected = torch.tensor([[3.0, 3.5], [6.0, 1.5]]) / smoothed[:, None]
    assert torch.allclose(vq.codebook, expected, atol=1e-6)
    assert torch.allclose(vq.codebook, torch.tensor([[2.0, 7 / 3], [6.0, 1.5]]), atol=1e-4)


def test_ema_moves_used_codes_towards_the_mean_of_their_vectors():
    torch.manual_seed(0)
    vq = _ready_quantizer(4, 3, decay=0.9, dead_threshold=0.0)
    before = vq.codebook.clone()
    flat = torch.randn(40, 3) * 0.5 + 20.0
    codes = torch.tensor([0, 1] * 20)
    for step in range(3):
        distances = []
        vq.update(flat, codes)
        for k in (0, 1):
            mean = flat[codes == k].mean(0)
            distances.append((float((before[k] - mean).norm()), float((vq.codebook[k] - mean).norm())))
        for old, new in distances:
            assert new < old
        before = vq.codebook.clone()
    # after many steps a used code converges to the mean of its vectors
    for _ in range(300):
        vq.update(flat, codes)
    for k in (0, 1):
        assert torch.allclose(vq.codebook[k], flat[codes == k].mean(0), atol=1e-2)


def test_dead_codes_restart_from_inputs_and_live_codes_do_not():
    torch.manual_seed(0)
    vq = _ready_quantizer(4, 3, decay=0.99, dead_threshold=1.0)
    flat = torch.randn(30, 3) + 50.0
    codes = torch.tensor([0, 1, 1] * 10)  # codes 2 and 3 get nothing: count 0.99 < 1.0 -> dead
    n_dead = vq.update(flat, codes)
    assert n_dead == 2
    rows = {tuple(row.tolist()) for row in flat}
    for k in (2, 3):
        assert tuple(vq.codebook[k].tolist()) in rows, f"code {k} was not restarted from an input row"
        assert torch.equal(vq.ema_sum[k], vq.codebook[k])
        assert float(vq.ema_count[k]) == 1.0
    for k in (0, 1):  # live codes follow their EMA and are not rows of the input
        assert float(vq.ema_count[k]) >= 1.0
        assert tuple(vq.codebook[k].tolist()) not in rows
        assert float((vq.codebook[k] - 50.0).norm()) < float((torch.arange(3.0) + 3 * k - 50.0).norm())


def test_first_training_forward_initialises_the_codebook_from_encoder_outputs():
    torch.manual_seed(0)
    model = tiny(ema_decay=1.0)  # decay 1: the EMA step leaves the initial codebook exactly as drawn
    x = blobs(2)
    assert not bool(model.quantizer.initialized)
    random_init = model.quantizer.codebook.clone()
    with torch.no_grad():
        z = model.encoder(x)
    model.train()
    with torch.no_grad():
        model(x)
    assert bool(model.quantizer.initialized)
    assert not torch.equal(model.quantizer.codebook, random_init)
    rows = z.permute(0, 2, 3, 1).reshape(-1, model.cfg.code_dim)
    for code in model.quantizer.codebook:
        assert bool(((rows - code).abs().max(1).values < 1e-6).any()), "a code is not an encoder output"


def test_eval_forward_leaves_the_codebook_alone():
    model = trained_tiny(steps=2)
    state = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    with torch.no_grad():
        model(blobs(2, seed=3))
    for key, value in model.quantizer.state_dict().items():
        assert torch.equal(value, state[key]), key


# ----------------------------------------------------------------------------- interface


def test_encode_decode_and_forward_shapes():
    model = trained_tiny(steps=1)
    x = blobs(3)
    codes = model.encode(x)
    assert codes.shape == (3, 16, 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    assert model.grid_size(64) == 16 and model.grid_size() == 64
    recon = model.decode(codes)
    assert recon.shape == x.shape
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0
    with torch.no_grad():
        out = model(x)
    assert out.recon.shape == x.shape
    assert torch.equal(out.codes, codes)
    assert torch.allclose(out.recon, recon)
    assert out.loss.ndim == 0
    assert set(out.losses) == {"ssim_loss", "l1", "commitment"}
    total = out.losses["ssim_loss"] + model.cfg.l1_weight * out.losses["l1"] + out.losses["commitment"]
    assert torch.allclose(out.loss, total)


def test_default_config_geometry():
    cfg = VQVAEConfig()
    assert cfg.downsample == 4
    assert VQVAEConfig.from_dict({"widths": [8, 8, 8], "unknown": 1}).widths == (8, 8, 8)


# ----------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip(tmp_path):
    model = trained_tiny(steps=3)
    folder = model.save(tmp_path / "ckpt", note="hello")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    loaded = VQVAE.from_pretrained(folder)
    assert not loaded.training
    assert loaded.fingerprint() == model.fingerprint()
    assert loaded.meta["fingerprint"] == model.fingerprint()
    assert loaded.meta["note"] == "hello" and loaded.meta["kind"] == "vqvae"
    assert loaded.cfg == model.cfg
    x = blobs(2, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        assert torch.equal(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)))
        assert torch.equal(loaded(x).recon, model(x).recon)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not list(folder.glob(".*.tmp")), "temporary files left behind"


def test_fingerprint_changes_with_the_codebook():
    model = trained_tiny(steps=1)
    before = model.fingerprint()
    model.quantizer.codebook[0, 0] += 1.0
    assert model.fingerprint() != before


@pytest.fixture
def saved(tmp_path) -> Path:
    return tiny().save(tmp_path / "ckpt")


def _load_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        VQVAE.from_pretrained(folder)
    return str(info.value)


def test_truncated_weights_are_refused(saved):
    weights = saved / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    message = _load_error(saved)
    assert "model.safetensors" in message and "truncated" in message


def test_garbage_weights_are_refused(saved):
    (saved / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    assert "model.safetensors" in _load_error(saved)
    (saved / "model.safetensors").write_bytes(b"")
    assert "model.safetensors" in _load_error(saved)


def test_missing_weights_are_refused(saved):
    (saved / "model.safetensors").unlink()
    message = _load_error(saved)
    assert "model.safetensors" in message and "missing" in message


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '{"kind": "vqvae"}'])
def test_malformed_config_is_refused(saved, text):
    (saved / "config.json").write_text(text)
    assert "config.json" in _load_error(saved)


@pytest.mark.parametrize("arch", ["not a dict", {"widths": 8}, {"num_codes": "many"}])
def test_malformed_arch_is_refused(saved, arch):
    config = json.loads((saved / "config.json").read_text())
    config["arch"] = arch
    (saved / "config.json").write_text(json.dumps(config))
    assert "config.json" in _load_error(saved)


def test_missing_config_is_refused(saved):
    (saved / "config.json").unlink()
    assert "config.json" in _load_error(saved)


def _edit_arch(folder: Path, **arch) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["arch"].update(arch)
    (folder / "config.json").write_text(json.dumps(config))


def test_codebook_size_mismatch_names_file_and_shapes(saved):
    _edit_arch(saved, num_codes=32)
    message = _load_error(saved)
    assert "model.safetensors" in message
    assert "quantizer.codebook" in message and "(16, 8)" in message and "(32, 8)" in message


def test_code_dim_mismatch_names_file_and_shapes(saved):
    _edit_arch(saved, code_dim=4)
    message = _load_error(saved)
    assert "model.safetensors" in message
    assert "(16, 8)" in message and "(16, 4)" in message


def test_missing_and_unexpected_tensors_are_named(saved):
    _edit_arch(saved, num_res_blocks=2)
    message = _load_error(saved)
    assert "missing tensor" in message and "encoder.net" in message
    state = load_file(str(saved / "model.safetensors"))
    state["extra.weight"] = torch.zeros(1)
    checkpoint.write_tensors(saved / "model.safetensors", state)
    _edit_arch(saved, num_res_blocks=1)
    assert "unexpected tensor extra.weight" in _load_error(saved)


def test_pickle_beside_config_is_refused_with_a_pickle_hint(saved):
    (saved / "model.safetensors").unlink()
    torch.save(tiny().state_dict(), saved / "model.pt")
    message = _load_error(saved)
    assert "model.pt" in message and "pickle" in message


def test_pickle_only_folder_is_refused_with_a_pickle_hint(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save(tiny().state_dict(), folder / "model.pt")
    message = _load_error(folder)
    assert "model.pt" in message and "pickle" in message


def test_other_kinds_are_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    config["kind"] = "prior"
    (saved / "config.json").write_text(json.dumps(config))
    message = _load_error(saved)
    assert "prior" in message and "VQ-VAE" in message


# ----------------------------------------------------------------------------- snapshots


def _write_files(content: str, fail_after_first: bool = False):
    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "a.txt").write_text(content)
        if fail_after_first:
            raise RuntimeError("killed half-way")
        (folder / "b.txt").write_text(content)
    return write


def test_write_snapshot_swaps_the_link_onto_complete_folders(tmp_path):
    run = tmp_path / "run"
    write_snapshot(run, "best", "0001", _write_files("one"))
    assert (run / "best").is_symlink() and (run / "best" / "b.txt").read_text() == "one"
    write_snapshot(run, "best", "0002", _write_files("two"))
    assert (run / "best").resolve().name == "best-0002"
    assert (run / "best" / "b.txt").read_text() == "two"
    assert not (run / "best-0001").exists(), "old snapshot folder not cleaned up"
    assert not (run / ".best.link").exists()


def test_write_snapshot_keeps_the_old_snapshot_when_the_write_fails(tmp_path):
    run = tmp_path / "run"
    write_snapshot(run, "best", "0001", _write_files("one"))
    write_snapshot(run, "last", "0001", _write_files("last"))
    with pytest.raises(RuntimeError, match="half-way"):
        write_snapshot(run, "best", "0002", _write_files("two", fail_after_first=True))
    assert (run / "best").resolve().name == "best-0001"
    assert (run / "best" / "a.txt").read_text() == "one" and (run / "best" / "b.txt").read_text() == "one"
    assert (run / "last" / "b.txt").read_text() == "last"  # another name is untouched
    # the next good write replaces the debris of the failed one
    write_snapshot(run, "best", "0003", _write_files("three"))
    assert (run / "best" / "b.txt").read_text() == "three"
    assert sorted(p.name for p in run.glob("best-*")) == ["best-0003"]


def test_write_snapshot_with_the_same_tag_keeps_the_old_snapshot_when_the_write_fails(tmp_path):
    run = tmp_path / "run"
    write_snapshot(run, "best", "0003", _write_files("one"))
    with pytest.raises(RuntimeError, match="half-way"):
        write_snapshot(run, "best", "0003", _write_files("two", fail_after_first=True))
    assert (run / "best" / "b.txt").read_text() == "one"


# ----------------------------------------------------------------------------- the training script


TRAIN_FLAGS = ["--widths", "8,8", "--res-width", "8", "--num-codes", "16", "--code-dim", "8", "--max-steps", "2",
               "--batch-size", "4", "--crop", "64", "--device", "cpu", "--seed", "0"]


class _Killed(BaseException):
    """Stands in for a kill between epochs (after the epoch's snapshots are on disk)."""


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different}"


def test_train_script_end_to_end_and_deterministic_resume(tmp_path, folder_tree, cache_dir, monkeypatch, capsys):
    train = train_script("train_vqvae")
    flags = ["--data-dir", str(folder_tree), *TRAIN_FLAGS]

    # 1. two epochs, then --resume to three
    run = tmp_path / "run-2-then-3"
    record = train.main([*flags, "--out", str(run), "--epochs", "2"])
    assert record["epoch"] == 2
    for name in ("best", "last", "curves.png", "results.png", "history.json"):
        assert (run / name).exists(), name
    assert (run / "best" / "config.json").is_file() and (run / "last" / "training_state.safetensors").is_file()
    assert cache_dir.is_dir() and any(cache_dir.iterdir()), "BRAINVQ_CACHE was not used"
    best = VQVAE.from_pretrained(run / "best")
    assert best.cfg.num_codes == 16 and best.cfg.widths == (8, 8)
    assert best.meta["train"]["epochs"] == 2 and "val_ssim" in best.meta["metrics"]
    assert len(json.loads((run / "history.json").read_text())) == 2
    capsys.readouterr()
    record = train.main([*flags, "--out", str(run), "--epochs", "3", "--resume"])
    assert "resumed from" in capsys.readouterr().out
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] and record["epoch"] == 3
    assert (run / "last").resolve().name == "last-0003"
    assert sorted(p.name for p in run.glob("last-*")) == ["last-0003"]

    # 2. an uninterrupted three-epoch run
    straight = tmp_path / "run-3"
    train.main([*flags, "--out", str(straight), "--epochs", "3"])

    # 3. the same three-epoch run killed after epoch 2, then resumed
    killed = tmp_path / "run-3-killed"
    real_write_history = training.write_history

    def write_history_then_die(run_dir, history):
        real_write_history(run_dir, history)
        if len(history) == 2:
            raise _Killed

    monkeypatch.setattr(training, "write_history", write_history_then_die)
    with pytest.raises(_Killed):
        train.main([*flags, "--out", str(killed), "--epochs", "3"])
    monkeypatch.setattr(training, "write_history", real_write_history)
    assert (killed / "last").resolve().name == "last-0002"
    train.main([*flags, "--out", str(killed), "--epochs", "3", "--resume"])

    _assert_same_weights(_weights(killed), _weights(straight))
    strip = lambda h: [{k: v for k, v in r.items() if k != "images_per_s"} for r in h]  # noqa: E731
    assert strip(json.loads((killed / "history.json").read_text())) == \
        strip(json.loads((straight / "history.json").read_text()))

    # The 2-then-3 run is NOT the same training: the cosine schedule lr_at(epoch) depends on --epochs, so its
    # epochs 1-2 ran at the 2-epoch schedule's rates. Its last epoch runs at the 3-epoch rate.
    two_then_three = json.loads((run / "history.json").read_text())
    three = json.loads((straight / "history.json").read_text())
    assert two_then_three[0]["lr"] == three[0]["lr"]
    assert two_then_three[1]["lr"] != three[1]["lr"]
    assert two_then_three[2]["lr"] == three[2]["lr"]

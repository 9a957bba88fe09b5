"""Both training scripts under torchrun (DDP over gloo, 2 CPU processes) against one plain process.

One process with ``--batch-size 4`` and two with ``--batch-size 2`` each see the same global batch at every
step (``data.GlobalBatchSampler``), draw the same codebook rows (``VectorQuantizer._random_rows``) and average
gradients to the same global-batch mean, so they compute the same updates. What still differs is the float
summation order: DDP sums two half-batch gradients where one process sums the whole batch, and the EMA counts and
sums of the codebook are all-reduced partial sums. That is a few float32 ulps per step (measured after one
step: a few 1e-7 at most in every tensor, ~1e-6 relative).

Tolerances, and why they still catch a real divergence:

* PixelCNN weights: rtol 1e-5, atol 1e-6. Training on fixed codes is smooth, rounding stays rounding: after
  18 steps the runs differ by <= 6e-8.
* VQ-VAE: the relative L2 distance ``|two - one| / |one|`` of the network weights taken together, of the
  codebook, and of the EMA counts and sums. Rounding does not stay rounding here: Adam divides by sqrt(v), so a
  near-zero gradient whose sign the reordering flips moves its weight by a whole lr step, and nearest-code
  assignment is discrete (a row two codes tie for, to float rounding, goes to either and moves 1 % of a count).
  How far that carries depends on the CPU's kernels: on an AVX-512 host one weight of 1,024 ends 1.08e-3 apart
  and an EMA count 0.33 apart, so element-wise bounds are a guess at the host. Measured on these 2 epochs
  (AVX-512/AMX Xeon): rounding gives 5.0e-4 (network), 2.3e-4 (codebook), 6.8e-3 (EMA); the bounds are 5e-3,
  5e-3 and 5e-2. A real bug is far outside them: DDP left out (no gradient averaging) gives 3.1e-2, 2.1e-2 and
  0.40, and the previous DDP code (codebook draws from rank 0 only, a different shuffle per world size) ends
  with weights 1e-2 apart, codebook 3.6e-2 and EMA counts 40.
  Images are uniform noise: the slices of ``helpers.make_folder_tree`` have flat black margins and dim
  backgrounds, where a freshly initialised encoder gives near-identical rows and codes start within 1e-5 of each
  other, so rows tie from step 2 on and the comparison would measure the model's sensitivity, not DDP.
* Resume under torchrun: bit-identical. Interrupted after epoch 1 (``--epochs 1``; epoch 1's learning rate,
  lr_at(0), is ``--lr`` whatever ``--epochs``) and resumed with ``--epochs 2`` at the same world size, the run
  restores weights, codebook buffers, Adam state and the CPU RNG (which the codebook draws use), so it repeats
  the uninterrupted run's arithmetic exactly.

Under a minute on two cores (40-55 s measured): six launches, two single-process and four torchrun.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from brainvq.data import make_loader
from brainvq.training import epoch_seed

REPO_ROOT = Path(__file__).resolve().parents[1]
VQ_SCRIPT, PRIOR_SCRIPT = "train/train_vqvae.py", "train/train_pixelcnn.py"
TINY_VQ = ["--widths", "8,8", "--res-width", "8", "--res-blocks", "1", "--num-codes", "16", "--code-dim", "8",
           "--crop", "64"]
TINY_PRIOR = ["--channels", "8", "--layers", "2", "--embed-dim", "8", "--pos-dim", "4", "--max-dilation", "2"]
RUN_FILES = {"best", "last", "history.json", "curves.png"}
CLUES = ("Error", "error", "terminate", "what()", "Traceback", "File \"", "Abort", "rank")


def make_noise_tree(root: Path, train: int = 40, test: int = 6, seed: int = 0) -> Path:
    """A plain-folder data root (``train/``, ``test/``) of 256x256 uniform-noise PNGs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    for part, count in (("train", train), ("test", test)):
        (root / part).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(root / part / f"img_{i:03d}.png")
    return root


def launch(script: str, args: list[str], nproc: int, env: dict[str, str]) -> str:
    """Run a training script in one plain process, or under torchrun with ``nproc`` processes; its output."""
    runner = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(nproc)]
    proc = subprocess.run(runner + [script, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        clues = [line for line in output.splitlines() if any(word in line for word in CLUES)]
        pytest.fail(f"{' '.join(runner + [script, *args])} exited with {proc.returncode}:\n" + "\n".join(clues[-40:])
                    + f"\n...\n{output[-3000:]}")
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """All six launches, once for the module: {name: (out folder, output)} plus timings."""
    root = tmp_path_factory.mktemp("ddp")
    data_dir = make_noise_tree(root / "data")
    env = {**os.environ, "BRAINVQ_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("BRAINVQ_DATA", None)
    vq = ["--data-dir", str(data_dir), *TINY_VQ]
    plan = {
        "vq1": (VQ_SCRIPT, vq + ["--epochs", "2", "--batch-size", "4"], 1),
        "vq2": (VQ_SCRIPT, vq + ["--epochs", "2", "--batch-size", "2"], 2),
        "vq2_cut": (VQ_SCRIPT, vq + ["--epochs", "1", "--batch-size", "2"], 2),
        "vq2_resumed": (VQ_SCRIPT, vq + ["--epochs", "2", "--batch-size", "2", "--resume"], 2),
        "prior1": (PRIOR_SCRIPT, ["--batch-size", "4"], 1),
        "prior2": (PRIOR_SCRIPT, ["--batch-size", "2"], 2),
    }
    results: dict = {"seconds": {}}
    for name, (script, args, nproc) in plan.items():
        out = root / name.replace("_resumed", "_cut")  # the resumed run continues the cut one's folder
        if script == PRIOR_SCRIPT:
            args = ["--vqvae", str(root / "vq1" / "last"), "--data-dir", str(data_dir), *TINY_PRIOR,
                    "--epochs", "2", *args]
        started = time.time()
        results[name] = (out, launch(script, [*args, "--out", str(out)], nproc, env))
        results["seconds"][name] = round(time.time() - started, 1)
    print("launch seconds:", results["seconds"])
    return results


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "last" / "model.safetensors"))


def history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


# ----------------------------------------------------------------------------- the sampler (in process)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_global_batch_is_the_same_at_any_world_size(world, drop_last):
    dataset = TensorDataset(torch.arange(37))
    orders = []
    for epoch in (0, 1):
        single = make_loader(dataset, 2 * world, shuffle=True, seed=5, drop_last=drop_last)
        single.sampler.set_epoch(epoch)
        ranks = [make_loader(dataset, 2, shuffle=True, seed=5, distributed=True, drop_last=drop_last, rank=r,
                             world_size=world) for r in range(world)]
        per_rank = []
        for loader in ranks:
            loader.sampler.set_epoch(epoch)
            per_rank.append([batch.tolist() for (batch,) in loader])
            assert len(per_rank[-1]) == len(loader)
        assert len({len(batches) for batches in per_rank}) == 1, "ranks must take the same number of steps"
        global_batches = [sum((batches[step] for batches in per_rank), []) for step in range(len(per_rank[0]))]
        expected = [batch.tolist() for (batch,) in single]
        if drop_last:
            assert global_batches == expected  # row for row, in rank order
        else:  # the last partial global batch is padded by wrapping round, so every rank has a batch
            assert global_batches[:-1] == expected[:-1]
            assert global_batches[-1][:len(expected[-1])] == expected[-1]
        orders.append(sum(expected, []))
    assert orders[0] != orders[1]  # set_epoch reshuffles


def test_single_process_order_is_unchanged_from_random_sampler():
    """Runs begun before the sampler existed (RandomSampler seeded with epoch_seed) resume on the same order."""
    dataset = TensorDataset(torch.arange(50))
    for epoch in (0, 3):
        old = DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True,
                         generator=torch.Generator().manual_seed(epoch_seed(7, epoch)))
        new = make_loader(dataset, 4, shuffle=True, seed=7, drop_last=True)
        new.sampler.set_epoch(epoch)
        assert [b.tolist() for (b,) in new] == [b.tolist() for (b,) in old]


# ----------------------------------------------------------------------------- torchrun against one process


def test_vqvae_two_processes_match_one_process(runs):
    one, two = weights(runs["vq1"][0]), weights(runs["vq2"][0])
    assert one.keys() == two.keys()
    groups: dict[str, list[str]] = {"network": [], "quantizer.codebook": [], "quantizer.ema": []}
    for name, tensor in one.items():
        if not tensor.dtype.is_floating_point:
            assert torch.equal(tensor, two[name]), name
        else:
            groups[next((g for g in groups if name.startswith(g)), "network")].append(name)
    bounds = {"network": 5e-3, "quantizer.codebook": 5e-3, "quantizer.ema": 5e-2}  # see the module docstring
    for group, names in groups.items():
        a = torch.cat([one[n].flatten() for n in names])
        b = torch.cat([two[n].flatten() for n in names])
        distance = ((b - a).norm() / a.norm()).item()
        assert distance <= bounds[group], f"{group}: relative L2 distance {distance:.2e} > {bounds[group]:.0e}"
    # The metrics are all-reduced: rank 0 reports the global numbers one process reports. Measured (rounding vs
    # DDP left out): losses 1.5e-6 vs 2.5e-5 relative; SSIM (about 0.011 on noise) 1.3e-6 vs 3.2e-5 absolute;
    # perplexity 1.4e-2 vs 0.57 relative.
    for a, b in zip(history(runs["vq1"][0]), history(runs["vq2"][0]), strict=True):
        assert a["epoch"] == b["epoch"] and a["lr"] == b["lr"]
        for key in ("train_loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        for key in ("train_ssim", "val_ssim"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
        assert abs(a["codes_used"] - b["codes_used"]) <= 1
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=5e-2)


def test_pixelcnn_two_processes_match_one_process(runs):
    one, two = weights(runs["prior1"][0]), weights(runs["prior2"][0])
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for a, b in zip(history(runs["prior1"][0]), history(runs["prior2"][0]), strict=True):
        for key in ("train_bits", "val_bits", "train_acc", "val_acc", "unigram_bits"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_resume_under_torchrun_repeats_the_uninterrupted_run(runs):
    out, output = runs["vq2_resumed"]
    assert output.count("resumed from") == 1 and "at epoch 2" in output  # printed by rank 0 only
    assert [h["epoch"] for h in history(out)] == [1, 2]
    resumed, uninterrupted = weights(out), weights(runs["vq2"][0])
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs after resuming"
    assert history(out)[1]["train_loss"] == history(runs["vq2"][0])[1]["train_loss"]


@pytest.mark.parametrize("name, extra", [("vq2", {"results.png"}), ("vq2_resumed", {"results.png"}),
                                         ("prior2", {"codes-*-train.npy", "codes-*-val.npy"})])
def test_only_rank_zero_writes(runs, name, extra):
    out, output = runs[name]
    files = {p.name for p in out.iterdir()}
    # One snapshot folder per link: a second writer would have left e.g. last-0002-<ns> or a .tmp file.
    snapshots = {f for f in files if f.startswith(("best-", "last-"))}
    assert len(snapshots) == 2 and {f.split("-")[0] for f in snapshots} == {"best", "last"}, files
    patterns = {f if "*" not in f else next((g for g in files if Path(g).match(f)), f) for f in extra}
    assert files - snapshots == RUN_FILES | patterns, files
    for folder in ("best", "last"):
        model = out / folder / ("pixelcnn" if name == "prior2" and folder == "best" else "")  # prior's best: a bundle
        json.loads((model / "config.json").read_text())  # complete, parseable
    epochs = [h["epoch"] for h in history(out)]
    assert epochs == [1, 2]
    for epoch in ([2] if name == "vq2_resumed" else epochs):  # one line per epoch: only rank 0 prints
        assert output.count(f"epoch={epoch} ") == 1, output[-2000:]

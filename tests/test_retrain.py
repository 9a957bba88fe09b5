"""A new user's retrain-then-reload path, word for word: the README's smoke commands run at tiny scale, and the
run folder they leave loads in the app's Models tab as it is. Plus the pieces that path relies on: the data
limit, the split seed kept apart from the training seed, and the code cache keyed by everything that changes
the codes.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brainvq import data
from brainvq.training import take
from brainvq.vqvae import VQVAE, VQVAEConfig, encode_array
from helpers import make_folder_tree, train_script
from test_app import free_port, save_tiny_bundle

pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting':Warning"),  # gradio's pandas use
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning")]
REPO_ROOT = Path(__file__).resolve().parents[1]
# Tiny models and batches appended to the README's commands (argparse keeps the last value of a flag).
TINY = {"train_vqvae.py": ["--widths", "8,8", "--res-width", "8", "--res-blocks", "1", "--num-codes", "16",
                           "--code-dim", "8", "--crop", "64"],
        "train_pixelcnn.py": ["--channels", "8", "--layers", "2", "--embed-dim", "8", "--pos-dim", "4",
                              "--max-dilation", "2"]}
COMMON = ["--batch-size", "4", "--max-steps", "2", "--device", "cpu"]


def readme_smoke_commands() -> list[list[str]]:
    """The training commands of the README's smoke run, in order, and the folder it says to load."""
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"\*\*Smoke run\*\*.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no smoke-run block"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    return [shlex.split(line) for line in lines if line]


def test_the_readme_smoke_run_loads_in_the_models_tab(tmp_path):
    commands = readme_smoke_commands()
    assert [c[:2] for c in commands] == [["python", "train/train_vqvae.py"], ["python", "train/train_pixelcnn.py"],
                                         ["python", "app.py"]]
    smoke_text = (REPO_ROOT / "README.md").read_text().split("**Smoke run**")[1]
    loaded = re.search(r"Models tab: load (\S+)", smoke_text)[1]
    env = {**os.environ, "BRAINVQ_DATA": str(make_folder_tree(tmp_path / "data", per_class=20, test_count=6)),
           "BRAINVQ_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    for command in commands[:2]:
        script = Path(command[1]).name
        argv = [sys.executable, str(REPO_ROOT / command[1]), *command[2:], *TINY[script], *COMMON]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stderr[-3000:]}"
        # Progress: the bar's total is what --max-steps lets run; validation (and encoding) have bars too.
        assert "epoch 1/1:   0%|          | 0/2 [" in proc.stderr, proc.stderr[-2000:]
        assert "validation:   0%|          | 0/" in proc.stderr
        if script == "train_pixelcnn.py":
            assert "encoding train codes:   0%" in proc.stderr and "encoding val codes:   0%" in proc.stderr
    run = tmp_path / loaded
    assert sorted(p.name for p in run.iterdir()) == ["pixelcnn", "vqvae"]

    import app
    from gradio_client import Client

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        mp.setenv("BRAINVQ_CACHE", str(tmp_path / "cache"))
        settings = app.Settings(data_dir=env["BRAINVQ_DATA"], checkpoints=save_tiny_bundle(tmp_path / "ckpt", 0),
                                allow_dirs=[tmp_path / "runs"], offline=True, host="127.0.0.1", port=free_port())
        blocks, url = app.launch(settings, prevent_thread_lock=True, quiet=True)
        try:
            client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
            status, info, _ = client.predict(str(run), api_name="/load_local")
            assert status.startswith("**Loaded**"), status
            assert "val bits per code" in info and "val ssim" in info  # both halves, with their metrics
            _, images, done = client.predict(1, 1.0, 0, 1.0, 0, api_name="/generate")
            assert len(images) == 1 and done.startswith("Done"), done
            *_, metrics, notes = client.predict("test_000.png", api_name="/reconstruct_sample")
            assert "SSIM" in metrics, notes
            vqvae_run = tmp_path / commands[0][commands[0].index("--out") + 1] / "best"
            status, info, _ = client.predict(str(vqvae_run), api_name="/load_local")
            assert status.startswith("**Load failed:**") and "holds a single vqvae checkpoint" in status
        finally:
            blocks.close()


def test_limit_takes_slices_from_the_whole_split(folder_tree):
    train = data.load_split(folder_tree, "train", 0)
    few = take(train, 6)
    assert len(few) == 6 and {item.label for item in few.items} == {"ClassA", "ClassB"}
    assert np.array_equal(few.images[0], train.images[0]) and np.array_equal(few.images[-1], train.images[-1])
    assert take(train, 0) is train and take(train, 10_000) is train


def test_code_cache_is_keyed_by_data_split_seed_and_limit(tmp_path, folder_tree, oasis_tree):
    script = train_script("train_pixelcnn")
    torch.manual_seed(0)
    vqvae = VQVAE(VQVAEConfig(num_codes=16, code_dim=8, widths=(8, 8), res_width=8, num_res_blocks=1)).eval()
    cache = tmp_path / "codes"

    def codes(root, split_seed=0, limit=0, split="val"):
        args = script.parse_args(["--split-seed", str(split_seed), "--limit", str(limit)])
        slices = take(data.load_split(root, split, split_seed), limit)
        return script.cached_codes(vqvae, args, slices, split, cache, is_main=True), slices

    first, slices = codes(folder_tree)
    assert len(list(cache.glob("codes-*-val.npy"))) == 1
    again, _ = codes(folder_tree)
    assert torch.equal(again, first) and len(list(cache.glob("*.npy"))) == 1  # the same key reads the cache
    other_split, other = codes(folder_tree, split_seed=1)
    assert [i.path for i in other.items] != [i.path for i in slices.items]
    assert len(list(cache.glob("*.npy"))) == 2  # seed 1's validation slices were encoded, not seed 0's reused
    assert torch.equal(other_split, encode_array(vqvae, other.images))
    codes(folder_tree, limit=2)
    codes(oasis_tree)
    names = sorted(p.name for p in cache.glob("*.npy"))
    assert len(names) == 4 and len({n.split("-")[1] for n in names}) == 1, names  # one VQ-VAE, four data keys
    zoomed = script.cached_codes(vqvae, script.parse_args([]), slices, "val", cache, is_main=True, zoom=0.9)
    assert len(list(cache.glob("*.npy"))) == 5                 # a zoom is a key of its own, not the unzoomed codes
    assert torch.equal(zoomed, encode_array(vqvae, data.zoom_frames(slices.images, 0.9)))
    assert script.parse_args(["--zoom", "0.9,1,1.1"]).zoom == [0.9, 1.0, 1.1]
    with pytest.raises(SystemExit):
        script.parse_args(["--zoom", "0,x"])

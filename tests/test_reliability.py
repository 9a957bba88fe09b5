"""Reliability under faults and bad input that the other test files do not already cover (docs/reliability.md).

* Training killed with a real SIGKILL (mid-epoch, and while an epoch's snapshots are being written), then
  ``--resume``: ``best`` and ``last`` always point at complete, loadable folders, and the resumed VQ-VAE run ends
  bit-identical to an uninterrupted one. The PixelCNN script is killed mid-epoch and resumed to the end.
* The data cache build killed with SIGKILL while decoding, while writing the array, between the array and its
  manifest, and at timed moments: the next load rebuilds and returns the current images, never stale ones.
* A hypothesis fuzz of ``demo.prepare_upload``: an uint8 256x256 slice with notes, or an ``UploadError``; nothing
  else ever escapes.
* The served app (in-process, tiny models, like tests/test_app.py): a fixed corpus of odd uploads, the upload
  size limit enforced by the server itself, and checkpoint folders that must fail to load (truncated weights,
  a prior of another VQ-VAE, a pickle, wrong K, no weights) while the previous models stay in use.

The unit-level cases (damaged caches, corrupt images, bad checkpoints, Hub failures, path traversal, the file
route) live in test_data.py, test_vqvae.py, test_hub.py and test_app.py.
"""
from __future__ import annotations

import base64
import io
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from brainvq import data, demo
from brainvq.checkpoint import STATE_JSON, STATE_NAME
from brainvq.pixelcnn import GatedPixelCNN
from brainvq.vqvae import VQVAE, VQVAEConfig
from helpers import brain_slice, make_folder_tree
from test_app import constant_png, free_port, save_tiny_bundle  # the app tests' tiny models and builders

pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting':Warning"),  # gradio's pandas use
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
              pytest.mark.filterwarnings("ignore:Saving I mode images as PNG is deprecated:DeprecationWarning")]
REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_VQ = ["--widths", "8,8", "--res-width", "8", "--res-blocks", "1", "--num-codes", "16", "--code-dim", "8",
           "--crop", "64", "--batch-size", "2", "--epochs", "3", "--device", "cpu", "--seed", "0"]
TINY_PRIOR = ["--channels", "8", "--layers", "2", "--embed-dim", "8", "--pos-dim", "4", "--max-dilation", "2",
              "--batch-size", "2", "--epochs", "3", "--max-steps", "30", "--device", "cpu", "--seed", "0"]


# ============================================================================ training killed with SIGKILL


class Script:
    """A training script in its own process, its stdout and stderr collected as they come (tqdm writes '\\r')."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.args = args
        self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.chunks = {"out": [], "err": []}
        self.readers = [threading.Thread(target=self._read, args=(pipe, self.chunks[name]), daemon=True)
                        for name, pipe in (("out", self.proc.stdout), ("err", self.proc.stderr))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(pipe, chunks: list[bytes]) -> None:
        for chunk in iter(lambda: os.read(pipe.fileno(), 65536), b""):
            chunks.append(chunk)

    def text(self, name: str) -> str:
        return b"".join(self.chunks[name]).decode(errors="replace")

    def tail(self) -> str:
        return f"stdout:\n{self.text('out')[-2000:]}\nstderr:\n{self.text('err')[-2000:]}"

    def wait_for(self, pattern: str, stream: str, timeout: float = 60) -> re.Match:
        """Poll (every 2 ms) until ``pattern`` appears in the stream; fail if the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text(stream))
            if match:
                return match
            if self.proc.poll() is not None:
                time.sleep(0.05)  # let the readers drain
                match = re.search(pattern, self.text(stream))
                if match:
                    return match
                pytest.fail(f"{self.args[0]} ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.tail()}")
            time.sleep(0.002)
        pytest.fail(f"timed out waiting for {pattern!r}:\n{self.tail()}")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        for reader in self.readers:
            reader.join(timeout=5)
        assert self.proc.returncode == -signal.SIGKILL, self.tail()

    def finish(self, timeout: float = 120) -> str:
        self.proc.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=5)
        assert self.proc.returncode == 0, f"{self.args} exited with {self.proc.returncode}\n{self.tail()}"
        return self.text("out")


@pytest.fixture
def spawn():
    """Start training scripts; any still running when the test ends (a failed wait, say) is killed."""
    started: list[Script] = []

    def start(args: list[str], env: dict[str, str]) -> Script:
        started.append(Script(args, env))
        return started[-1]

    yield start
    for script in started:
        if script.proc.poll() is None:
            script.proc.kill()
            script.proc.wait(timeout=30)


def mid_epoch(script: Script, epoch: int, epochs: int, before_step: int) -> int:
    """Wait until tqdm shows ``epoch`` between step 1 and ``before_step``, then SIGKILL; returns that step."""
    # generous: epoch 1, its validation, snapshots and curves all come first (slow on a loaded 2-core machine)
    match = script.wait_for(rf"epoch {epoch}/{epochs}:\s+\d+%\|[^|]*\|\s*([1-9]\d*)/\d+", "err", timeout=180)
    script.kill()
    step = int(match.group(1))
    assert step < before_step, f"the kill came too late to be mid-epoch (step {step}):\n{script.tail()}"
    return step


def check_snapshots(run: Path, load) -> dict[str, str]:
    """``best`` and ``last`` (when present) are links onto complete, loadable folders; returns their targets."""
    targets = {}
    for name in ("best", "last"):
        link = run / name
        if not link.exists():
            assert not link.is_symlink(), f"{name} is a dangling link"
            continue
        assert link.is_symlink(), f"{name} is not a link"
        folder = link.resolve()
        assert folder.parent == run.resolve() and re.fullmatch(rf"{name}-\d{{4}}(-\d+)?", folder.name), folder
        model = folder / "pixelcnn" if name == "best" and (folder / "pixelcnn").is_dir() else folder  # a bundle
        files = sorted(p.name for p in model.iterdir())
        assert not [f for f in files if f.endswith(".tmp") or f.startswith(".")], (name, files)
        assert {"model.safetensors", "config.json"} <= set(files), (name, files)
        load(model)
        json.loads((model / "config.json").read_text())
        if name == "last":
            assert {STATE_NAME, STATE_JSON} <= set(files), files
            state = json.loads((folder / STATE_JSON).read_text())
            load_file(str(folder / STATE_NAME))
            assert [h["epoch"] for h in state["history"]] == list(range(1, state["epoch"] + 2))
        targets[name] = folder.name
    return targets


def same_snapshot(name: str) -> str:
    """best-0002-1712345678 (written beside a half-written best-0002 after a kill) is still epoch 2's best."""
    return re.match(r"\w+-\d{4}", name).group(0)


def history_of(run: Path) -> list[dict]:
    """history.json without the wall-clock throughput, which no two runs share."""
    rows = json.loads((run / "history.json").read_text())
    return [{k: v for k, v in row.items() if k not in ("images_per_s", "grids_per_s")} for row in rows]


@pytest.fixture(scope="module")
def train_env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sigkill")
    # 90 training steps per epoch (~1 s at tiny size): room for a kill that lands mid-epoch.
    data_dir = make_folder_tree(root / "data", per_class=100, test_count=4)
    env = {**os.environ, "BRAINVQ_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("BRAINVQ_DATA", None)
    return {"root": root, "data": data_dir, "env": env}


@pytest.mark.slow
def test_vqvae_sigkill_mid_epoch_and_mid_snapshot_then_resume_matches_uninterrupted(train_env, spawn):
    root, env = train_env["root"], train_env["env"]
    script = ["train/train_vqvae.py", "--data-dir", str(train_env["data"]), *TINY_VQ]
    straight, killed = root / "vq-straight", root / "vq-killed"
    spawn([*script, "--out", str(straight)], env).finish()  # also builds the shared image cache

    # 1. SIGKILL while epoch 2 trains: epoch 1's snapshots stand, the partial epoch is simply lost.
    run = spawn([*script, "--out", str(killed)], env)
    mid_epoch(run, epoch=2, epochs=3, before_step=80)
    assert check_snapshots(killed, VQVAE.from_pretrained) == {"best": "best-0001", "last": "last-0001"}
    assert [h["epoch"] for h in history_of(killed)] == [1]

    # 2. Resume, and SIGKILL again the moment epoch 2 is reported, while its snapshots are being written.
    run = spawn([*script, "--out", str(killed), "--resume"], env)
    run.wait_for(r"epoch=2 ", "out")
    run.kill()
    assert "resumed from" in run.text("out") and "at epoch 2" in run.text("out")
    targets = check_snapshots(killed, VQVAE.from_pretrained)
    assert targets["last"] in ("last-0001", "last-0002"), targets

    # 3. Resume to the end: the same arithmetic as the run that was never interrupted.
    out = spawn([*script, "--out", str(killed), "--resume"], env).finish()
    assert "resumed from" in out
    targets = check_snapshots(killed, VQVAE.from_pretrained)
    assert {k: same_snapshot(v) for k, v in targets.items()} == check_snapshots(straight, VQVAE.from_pretrained)
    assert [h["epoch"] for h in history_of(killed)] == [1, 2, 3]
    assert history_of(killed) == history_of(straight)
    for name in ("last", "best"):
        a, b = load_file(str(killed / name / "model.safetensors")), load_file(str(straight / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ"
    # Snapshot folders other than the two linked ones were cleaned away.
    assert sorted(p.name for p in killed.glob("*-0*")) == sorted(targets.values())


@pytest.mark.slow
def test_pixelcnn_sigkill_mid_epoch_then_resume_completes(train_env, spawn):
    torch.manual_seed(0)  # an untrained tiny VQ-VAE (64x64 grid) is enough to give the prior codes to model
    vqvae = VQVAE(VQVAEConfig(num_codes=16, code_dim=8, widths=(8, 8), res_width=8, num_res_blocks=1)).eval()
    vqvae.save(train_env["root"] / "prior-vqvae")
    out = train_env["root"] / "prior-killed"
    script = ["train/train_pixelcnn.py", "--vqvae", str(train_env["root"] / "prior-vqvae"),
              "--data-dir", str(train_env["data"]), *TINY_PRIOR, "--out", str(out)]
    load = lambda folder: GatedPixelCNN.from_pretrained(folder, vqvae=vqvae)  # noqa: E731
    mid_epoch(spawn(script, train_env["env"]), epoch=2, epochs=3, before_step=28)
    assert check_snapshots(out, load) == {"best": "best-0001", "last": "last-0001"}
    text = spawn([*script, "--resume"], train_env["env"]).finish()
    assert "resumed from" in text and "at epoch 2" in text
    assert [h["epoch"] for h in history_of(out)] == [1, 2, 3]
    assert check_snapshots(out, load)["last"] == "last-0003"


# ============================================================================ data cache build killed


N_CACHED = 300


def write_version(root: Path, version: int) -> np.ndarray:
    """N_CACHED small test/ PNGs whose pixels depend on ``version``; returns what load_split must give back."""
    for part in ("train", "test"):
        (root / part).mkdir(parents=True, exist_ok=True)
    if not (root / "train" / "only.png").exists():
        Image.fromarray(brain_slice(32, 32, 0)).save(root / "train" / "only.png")
    rng = np.random.default_rng(version)
    for i in range(N_CACHED):
        Image.fromarray(rng.integers(0, 256, (24, 40), dtype=np.uint8)).save(root / "test" / f"s_{i:03d}.png")
    return np.stack([data.read_slice(root / "test" / f"s_{i:03d}.png") for i in range(N_CACHED)])


def build_in_child(root: Path, cache: Path, phase: str, ready) -> None:
    """Runs in a forked child: load_split(test), held open at ``phase`` until the parent's SIGKILL arrives."""
    hold = lambda: (ready.set(), time.sleep(120))  # noqa: E731
    if phase == "decode":  # while the images are being decoded: nothing is written yet
        real_read, count = data.read_slice, [0]

        def read_slice(path):
            count[0] += 1
            if count[0] == N_CACHED // 2:
                hold()
            return real_read(path)
        data.read_slice = read_slice
    elif phase == "array":  # half of the new array is in its temp file; the old manifest is already gone
        real_write = data.atomic_write_bytes

        def atomic_write_bytes(path, write):
            def half_then_hold(file):
                buffer = io.BytesIO()
                write(buffer)
                blob = buffer.getvalue()
                file.write(blob[:len(blob) // 2])
                file.flush()
                hold()
            return real_write(path, half_then_hold)
        data.atomic_write_bytes = atomic_write_bytes
    elif phase == "manifest":  # the new array is in place, its manifest not yet written
        def atomic_write_json(path, obj):
            hold()
        data.atomic_write_json = atomic_write_json
    else:
        ready.set()
    data.load_split(root, "test", cache_dir=cache)


def test_cache_build_killed_by_sigkill_is_rebuilt_with_the_current_images(tmp_path, capsys):
    root, cache = tmp_path / "images", tmp_path / "cache"
    fork = multiprocessing.get_context("fork")

    def run(phase: str, version: int, delay: float | None) -> float:
        ready = fork.Event()
        child = fork.Process(target=build_in_child, args=(root, cache, phase, ready))
        started = time.monotonic()
        child.start()
        assert ready.wait(60), "the child never reached the kill point"
        if delay is None:  # let it finish: a timing run
            child.join(60)
            assert child.exitcode == 0
            return time.monotonic() - started
        time.sleep(delay)
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        return time.monotonic() - started

    write_version(root, 0)
    build_seconds = run("complete", 0, None)  # a valid cache of version 0, and how long a build takes
    plans = [("decode", 0.0), ("array", 0.0), ("manifest", 0.0)] + [
        ("timed", build_seconds * f) for f in (0.2, 0.45, 0.7, 0.9)]
    for version, (phase, delay) in enumerate(plans, start=1):
        expected = write_version(root, version)  # the cache on disk is now stale
        run(phase, version, delay)
        manifests = list(cache.glob("*.json"))
        if phase in ("array", "manifest"):
            assert manifests == [], f"{phase}: a manifest outlived the array it described"
        if phase == "array":
            assert list(cache.glob(".*.tmp")), "the half-written array was not in a temp file"
        capsys.readouterr()
        loaded = data.load_split(root, "test", cache_dir=cache)
        assert [Path(item.path).name for item in loaded.items] == [f"s_{i:03d}.png" for i in range(N_CACHED)]
        assert np.array_equal(np.asarray(loaded.images), expected), f"{phase}: wrong pixels after the kill"
        rebuilt = "rebuilding cache" in capsys.readouterr().out
        assert rebuilt or phase == "timed", phase  # a timed kill may come after the build finished
        again = data.load_split(root, "test", cache_dir=cache)  # the rebuilt cache is trusted again
        assert np.array_equal(np.asarray(again.images), expected)
        assert "rebuilding" not in capsys.readouterr().out


# ============================================================================ prepare_upload fuzz


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "HSV", "LAB"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA", "ICO", "PCX", "IM", "SGI", "DDS"]


@st.composite
def upload_bytes(draw) -> bytes:
    """Random bytes, or a small random image in a random mode and format, possibly truncated or bit-flipped."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=4096))
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    size = len(Image.new(mode, (width, height)).tobytes())
    image = Image.frombytes(mode, (width, height), rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    if mode == "F":
        image = Image.fromarray(rng.normal(0, draw(st.sampled_from([1.0, 1e6])), (height, width)).astype(np.float32))
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    blob = b""
    for candidate, form in ((lambda: image, fmt), (lambda: image.convert("RGB"), fmt),
                            (lambda: image.convert("L"), fmt), (lambda: image.convert("L"), "PNG")):
        try:
            buffer = io.BytesIO()
            candidate().save(buffer, format=form)
            blob = buffer.getvalue()
            break
        except (OSError, ValueError, KeyError, TypeError):
            continue  # this format cannot store this mode (or size): try a plainer one
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if damage == "truncate" and len(blob) > 1:
        blob = blob[:draw(st.integers(1, len(blob) - 1))]
    elif damage == "flip" and blob:
        flipped = bytearray(blob)
        for position in draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8)):
            flipped[position] ^= 0xFF
        blob = bytes(flipped)
    return blob


# derandomize: the same 60 examples every run, so a red test is never luck. Longer random runs (3,000 + 4,000
# examples, and a targeted one with bit-flipped TIFF/GIF files) found the two files below.
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Corrupt EXIF data" and the like, on damaged files
@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(blob=upload_bytes(), suffix=st.sampled_from([".png", ".jpg", ".gif", ".bin", ""]))
def test_prepare_upload_fuzz_gives_a_slice_or_a_clear_upload_error(blob, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(blob)
        try:
            image, notes = demo.prepare_upload(path)
        except demo.UploadError as error:
            message = str(error)
            assert message.strip() and "Traceback" not in message and len(message) < 500, message
            return
    assert isinstance(image, np.ndarray) and image.shape == (256, 256) and image.dtype == np.uint8
    assert notes and all(isinstance(note, str) and note for note in notes)


# Damaged files on which Pillow raises TypeError ("Missing dimensions", TIFF) or struct.error (GIF) from
# ``image.n_frames``: prepare_upload catches OSError/ValueError/SyntaxError/EOFError/MemoryError only, so these
# escape as a bare exception (the app's handler catches DemoError only: the user sees Gradio's generic "Error").
DAMAGED = {
    "tiff_missing_dimensions": base64.b64decode(
        "SUkqAAgAAAALAAABBAABAAAAEQAAAAEBAwABAAAABwAAAAIBAwABAAAACAAAAAMBAwABAAAAAQAAAAYBAwABAAAAAQAAAA8BAgAEAAAAY2Ft"
        "ABEBBAABAAAAkgAAABIBAwABAAAABwAAABYBBAABAAAABwAAABcBBAABAAAAdwAAABwBAwABAAAAAQAAAAAArQAAAAAAAAAAAAAAAAAAAAAA"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="),
    "gif_short_frame_header": base64.b64decode("R0lGODdhVgAGAIAAAAAAAMQAACwAAAAAywAGAAAIDwABCBxIsKDBgwgTWywYEAAs"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_prepare_upload_damaged_files_found_by_fuzzing(name, tmp_path):
    path = tmp_path / f"{name}.img"
    path.write_bytes(DAMAGED[name])
    with pytest.raises(demo.UploadError) as caught:
        demo.prepare_upload(path)
    assert str(caught.value).strip()


# ============================================================================ the served app



class Payload:
    """Unpickling this would create ``marker``: proof that a pickle offered as weights was never loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_bundles(checkpoints: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Folders inside an allowed root that must not load, with a phrase the message must hold."""
    good = checkpoints
    out = {}
    truncated = checkpoints / "bad-truncated"
    for sub in ("vqvae", "pixelcnn"):
        shutil.copytree(good / sub, truncated / sub)
    weights = truncated / "vqvae" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out["truncated"] = (truncated, "not a readable safetensors file")

    mismatched = save_tiny_bundle(checkpoints / "bad-pair", seed=7, prior=False)  # another VQ-VAE ...
    shutil.copytree(good / "pixelcnn", mismatched / "pixelcnn")  # ... with the prior of the good one
    out["other_vqvae_prior"] = (mismatched, "was trained on VQ-VAE")

    pickled = checkpoints / "bad-pickle" / "vqvae"
    pickled.mkdir(parents=True)
    with open(pickled / "model.pt", "wb") as file:
        pickle.dump({"state_dict": Payload(root / "PICKLE-WAS-LOADED")}, file)
    out["pickle"] = (pickled.parent, "pickle files are never loaded")

    wrong_k = shutil.copytree(good / "vqvae", checkpoints / "bad-k" / "vqvae")
    config = json.loads((wrong_k / "config.json").read_text())
    config["arch"]["num_codes"] = 32
    (wrong_k / "config.json").write_text(json.dumps(config))
    out["wrong_k"] = (wrong_k.parent, "does not match config.json")

    no_weights = shutil.copytree(good / "vqvae", checkpoints / "bad-missing" / "vqvae")
    (no_weights / "model.safetensors").unlink()
    out["missing_weights"] = (no_weights.parent, "is missing")
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """app.py launched in-process (offline, tiny models) as in test_app.py, plus a client and bad bundles."""
    import app

    root = tmp_path_factory.mktemp("reliability-app")
    checkpoints = save_tiny_bundle(root / "checkpoints", seed=0)
    bad = bad_bundles(checkpoints, root)
    data_dir = make_folder_tree(root / "data", per_class=2, test_count=3)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"BRAINVQ_CACHE": str(root / "cache"),
                            "GRADIO_TEMP_DIR": str(root / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
                            "HF_HUB_CACHE": str(root / "hf-cache")}.items():
            mp.setenv(name, value)
        settings_ = app.Settings(data_dir=str(data_dir), checkpoints=checkpoints, offline=True, host="127.0.0.1",
                                 port=free_port())
        blocks, url = app.launch(settings_, prevent_thread_lock=True, quiet=True)
        try:
            client = Client(url, verbose=False, download_files=str(root / "downloads"))
            yield {"url": url, "client": client, "root": root, "bad": bad}
        finally:
            blocks.close()


def ssim_of(text: str) -> float:
    return float(re.search(r"SSIM (-?[0-9.]+)", text).group(1))


def upload_corpus(folder: Path) -> dict[str, tuple[Path, str | None, str]]:
    """name: (file, note expected on success or None when refused, phrase the note or message must hold)."""
    folder.mkdir(parents=True, exist_ok=True)
    slice_ = brain_slice(208, 176, seed=4)
    rgb = np.stack([slice_, slice_ // 2, slice_], -1)
    corpus: dict[str, tuple[Path, str | None, str]] = {}

    def add(name: str, filename: str, ok: bool, phrase: str, write) -> None:
        path = folder / filename
        write(path)
        corpus[name] = (path, "ok" if ok else None, phrase)

    add("random_bytes", "noise.png", False, "not an image",
        lambda p: p.write_bytes(np.random.default_rng(5).bytes(3000)))
    add("empty", "empty.png", False, "empty (0 bytes)", lambda p: p.write_bytes(b""))
    add("pdf", "doc.pdf", False, "PDFs", lambda p: p.write_bytes(b"%PDF-1.5\n1 0 obj <<>> endobj\n%%EOF\n"))
    add("truncated_png", "cut.png", False, "could not be decoded",
        lambda p: (Image.fromarray(slice_).save(p), p.write_bytes(p.read_bytes()[:700])))
    add("10000x10000", "bomb.png", False, "too large", lambda p: constant_png(p, 10_000, 10_000))
    add("rgba", "rgba.png", True, "flattened transparency",
        lambda p: Image.fromarray(np.dstack([rgb, np.full_like(slice_, 99)])).save(p))
    add("palette", "palette.png", True, "converted P",
        lambda p: Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(p))
    add("16_bit", "deep.png", True, "rescaled I", lambda p: Image.fromarray(slice_.astype(np.uint16) * 257).save(p))
    add("1x1", "dot.png", True, "very small", lambda p: Image.fromarray(np.array([[180]], np.uint8)).save(p))
    frames = [Image.fromarray(np.roll(slice_, 7 * i, 0)).convert("P") for i in range(4)]
    add("gif", "anim.gif", True, "first of its 4 frames",
        lambda p: frames[0].save(p, save_all=True, append_images=frames[1:], duration=80))
    return corpus


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_app_answers_every_upload_of_a_fixed_corpus_clearly(served, tmp_path):
    client = served["client"]
    for name, (path, ok, phrase) in upload_corpus(tmp_path / "corpus").items():
        original, grid, recon, metrics, notes = client.predict(handle_file(str(path)), api_name="/reconstruct_upload")
        assert "Traceback" not in notes and phrase in notes, (name, notes)
        if ok:
            assert notes.startswith("Uploaded image: read a") and -1 <= ssim_of(metrics) <= 1, (name, notes)
            assert np.asarray(Image.open(recon)).shape == (256, 256), name
        else:
            assert notes.startswith("**Cannot use this upload:**"), (name, notes)
            assert (original, grid, recon, metrics) == (None, None, None, ""), name
    info, _ = client.predict(api_name="/model_info")  # the server is still up and serving
    assert "codes (K) | 16" in info


def test_app_refuses_uploads_over_the_size_limit(served, tmp_path):
    url, client = served["url"].rstrip("/"), served["client"]
    big = tmp_path / "eleven.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(11 * 1024 * 1024))
    with pytest.raises(ValueError, match="exceeds the maximum file size of 10485760 bytes"):
        client.predict(handle_file(str(big)), api_name="/reconstruct_upload")  # gradio_client checks first
    with httpx.Client(timeout=60) as http, open(big, "rb") as file:  # a client that does not: the server refuses
        response = http.post(f"{url}/gradio_api/upload", files=[("files", ("eleven.png", file, "image/png"))])
    assert response.status_code in (400, 413), response.status_code
    assert "maximum allowed size of 10485760 bytes" in response.text, response.text[:300]
    limit = tmp_path / "limit.png"  # exactly at the limit: accepted by the server, refused by the demo's own check
    limit.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (demo.MAX_UPLOAD_BYTES - 8))
    *_, notes = client.predict(handle_file(str(limit)), api_name="/reconstruct_upload")
    assert notes.startswith("**Cannot use this upload:**") and "MB" not in notes, notes
    info, _ = client.predict(api_name="/model_info")
    assert "codes (K) | 16" in info


def test_app_keeps_its_models_when_a_checkpoint_fails_to_load(served):
    client, root = served["client"], served["root"]
    before, _ = client.predict(api_name="/model_info")
    *_, metrics, _ = client.predict("test/test_001.png", api_name="/reconstruct_sample")
    ssim_before = ssim_of(metrics)
    for name, (folder, phrase) in served["bad"].items():
        status, info, _ = client.predict(str(folder), api_name="/load_local")
        assert status.startswith("**Load failed:**") and phrase in status, (name, status)
        assert "previous models are still in use" in status and "Traceback" not in status, (name, status)
        assert info == before, name
        assert client.predict(api_name="/model_info")[0] == before, name
    assert not (root / "PICKLE-WAS-LOADED").exists(), "a pickle offered as weights was unpickled"
    *_, metrics, notes = client.predict("test/test_001.png", api_name="/reconstruct_sample")
    assert ssim_of(metrics) == ssim_before, notes  # the very same models still answer
    grid, images, status = client.predict(1, 1.0, 0, 1.0, 3, api_name="/generate")
    assert status.startswith("Done: 1 sample(s)") and len(images) == 1

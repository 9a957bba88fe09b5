"""The demo: brainvq.demo's logic, and app.py served in-process and driven through gradio_client.

Real tiny models (K=16, 64x64 grid) are built and saved into a temporary checkpoints folder; the app runs
offline on 127.0.0.1 with a tiny plain-folder data set, and every public endpoint is called over HTTP.
"""
from __future__ import annotations

import io
import re
import shutil
import socket
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from brainvq import demo, generation, hub
from brainvq.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.vqvae import VQVAE, VQVAEConfig
from helpers import brain_slice, make_folder_tree

gradio_client = pytest.importorskip("gradio_client")
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting':Warning"),  # gradio's pandas use
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning")]
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402  (gradio.Error from a component bound)


# ----------------------------------------------------------------------------- builders


def save_tiny_bundle(folder: Path, seed: int, prior: bool = True, sampling: dict | None = None) -> Path:
    """A real (untrained) VQ-VAE + PixelCNN pair small enough to sample a 64x64 grid in well under a second;
    ``sampling``: the prior's chosen sampling defaults (config.json's "sampling")."""
    torch.manual_seed(seed)
    vq = VQVAE(VQVAEConfig(num_codes=16, code_dim=8, widths=(8, 8), res_width=8, num_res_blocks=1)).eval()
    vq.save(folder / "vqvae", metrics={"val_ssim": 0.5 + seed / 100})
    if prior:
        net = GatedPixelCNN(PixelCNNConfig(num_codes=16, grid_size=64, channels=8, embed_dim=8, num_layers=2,
                                           pos_dim=2, head_channels=8))
        net.save(folder / "pixelcnn", vq.fingerprint(), **({"sampling": sampling} if sampling else {}))
    return folder


# The tiny models sample a grid in about a second, and the demo's 0.5 s between frames would leave a run two or
# three frames on a fast machine: the served demos stream a frame every 0.05 s instead.
FRAME_SECONDS = 0.05


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_image(path: Path, array: np.ndarray, mode: str | None = None, **save) -> Path:
    Image.fromarray(array, mode).save(path, **save) if mode else Image.fromarray(array).save(path, **save)
    return path


def constant_png(path: Path, width: int, height: int) -> Path:
    """A huge all-black grayscale PNG written row by row (a few hundred KB), without building it in memory."""
    raw = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * width
    body = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


SLICE = brain_slice(208, 176, seed=3)


@pytest.fixture
def uploads(tmp_path) -> dict[str, Path]:
    """Good images in many formats and modes, named by what they exercise."""
    rgb = np.stack([SLICE, SLICE // 2, SLICE], -1)
    files = {
        "png_l": write_image(tmp_path / "l.png", SLICE),
        "jpeg_rgb": write_image(tmp_path / "rgb.jpg", rgb, quality=90),
        "bmp": write_image(tmp_path / "x.bmp", rgb),
        "webp": write_image(tmp_path / "x.webp", SLICE),
        "tiff16": write_image(tmp_path / "x16.tif", SLICE.astype(np.uint16) * 257),
        "png16": write_image(tmp_path / "x16.png", SLICE.astype(np.uint16) * 257),
        "rgba": write_image(tmp_path / "rgba.png", np.dstack([rgb, np.full_like(SLICE, 128)]), "RGBA"),
        "palette": tmp_path / "p.png",
        "gif": tmp_path / "anim.gif",
        "tiny": write_image(tmp_path / "one.png", np.array([[200]], np.uint8)),
        "big": write_image(tmp_path / "big.png", np.kron(SLICE, np.ones((12, 12), np.uint8))),  # 2112x2496
        "cmyk": tmp_path / "cmyk.jpg",
    }
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(files["palette"])
    frames = [Image.fromarray(np.roll(SLICE, 10 * i, 1)).convert("P") for i in range(3)]
    frames[0].save(files["gif"], save_all=True, append_images=frames[1:], duration=100)
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk"])
    return files


@pytest.fixture
def bad_uploads(tmp_path) -> dict[str, tuple[Path, str]]:
    """Files that must be refused, with a phrase the message must contain."""
    rng = np.random.default_rng(0)
    truncated = io.BytesIO()
    Image.fromarray(SLICE).save(truncated, format="PNG")
    files = {
        "random": (tmp_path / "noise.png", rng.bytes(5000), "not an image"),
        "empty": (tmp_path / "empty.png", b"", "empty"),
        "pdf": (tmp_path / "scan.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n",
                "not an image"),
        "truncated": (tmp_path / "cut.png", truncated.getvalue()[:600], "could not be decoded"),
        "too_big_file": (tmp_path / "huge.bin", b"\x89PNG" + rng.bytes(demo.MAX_UPLOAD_BYTES), "limit is 10.0 MB"),
    }
    out = {}
    for name, (path, blob, phrase) in files.items():
        path.write_bytes(blob)
        out[name] = (path, phrase)
    out["bomb"] = (constant_png(tmp_path / "bomb.png", 10_000, 10_000), "too large")
    out["missing"] = (tmp_path / "nothing-here.png", "could not be read")
    return out


# ----------------------------------------------------------------------------- demo.py, no server


def test_prepare_upload_reads_many_formats(uploads):
    expected = {"tiff16": "rescaled", "png16": "rescaled", "rgba": "transparency", "gif": "first of its 3 frames",
                "tiny": "very small", "big": "resized 2112x2496", "palette": "converted P", "cmyk": "CMYK",
                "jpeg_rgb": "converted RGB", "png_l": "centre-padded 176x208"}
    for name, path in uploads.items():
        image, notes = demo.prepare_upload(path)
        assert image.shape == (256, 256) and image.dtype == np.uint8, name
        assert notes and notes[0].startswith("read a"), (name, notes)
        if name in expected:
            assert any(expected[name] in note for note in notes), (name, notes)
    png16, _ = demo.prepare_upload(uploads["png16"])
    png8, _ = demo.prepare_upload(uploads["png_l"])
    assert np.abs(png16.astype(int) - png8).max() <= 1  # 16-bit is rescaled, not clipped
    exact, notes = demo.prepare_upload(write_image(uploads["png_l"].with_name("full.png"), brain_slice(256, 256, 1)))
    assert np.array_equal(exact, brain_slice(256, 256, 1)) and "used as is" in notes[-1]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_prepare_upload_refuses_with_clear_messages(bad_uploads, tmp_path):
    for name, (path, phrase) in bad_uploads.items():
        with pytest.raises(demo.UploadError) as caught:
            demo.prepare_upload(path)
        message = str(caught.value)
        assert phrase in message, (name, message)
        assert "Traceback" not in message and len(message) < 400, (name, message)
    inside = tmp_path / "uploads" / "abc"
    inside.mkdir(parents=True)
    good = write_image(inside / "ok.png", SLICE)
    assert demo.prepare_upload(good, upload_root=tmp_path / "uploads")[0].shape == (256, 256)
    outside = write_image(tmp_path / "outside.png", SLICE)
    for path in (outside, inside / ".." / ".." / "outside.png", tmp_path / "missing.png", Path("/etc/passwd")):
        with pytest.raises(demo.UploadError, match="could not be read; please upload it again"):
            demo.prepare_upload(path, upload_root=tmp_path / "uploads")
    with pytest.raises(demo.UploadError, match="No file"):
        demo.prepare_upload(None)
    with pytest.raises(demo.UploadError, match="not a file"):
        demo.prepare_upload(tmp_path)


def test_samples_browse_and_filter(oasis_tree, folder_tree, tmp_path):
    bundled = demo.load_samples(None)
    assert bundled.layout == "bundled" and len(bundled) == 48 and bundled.notice is None
    assert bundled.classes() == ["MildDemented", "ModerateDemented", "NonDemented", "VeryMildDemented"]
    assert all(s.image.shape == (256, 256) for s in bundled.samples)
    assert len(demo.filter_samples(bundled.samples, "", "ModerateDemented")) == 12
    assert [s.key for s in demo.filter_samples(bundled.samples, "class:milddemented 26-19")] == [
        "MildDemented_26-19.jpg"]
    # class: matches whole class names: MildDemented is not VeryMildDemented, and "Mild" is no class at all
    assert {s.class_label for s in demo.filter_samples(bundled.samples, "class:MildDemented")} == {"MildDemented"}
    assert demo.filter_samples(bundled.samples, "class:Mild") == []
    # the Slice box takes the key, the caption the gallery shows, or the file name (with or without suffix)
    for text in ("MildDemented_26-19.jpg", "MildDemented · 26-19", "milddemented 26-19", "MildDemented_26-19"):
        assert bundled.get(text).key == "MildDemented_26-19.jpg", text
    with pytest.raises(demo.DemoError, match="No slice has the caption or file name 'nothing'"):
        bundled.get("nothing")
    with pytest.raises(demo.DemoError, match="Pick a slice"):
        bundled.get("  ")

    oasis = demo.load_samples(oasis_tree)
    assert oasis.layout == "oasis" and len(oasis) == 6  # 2 test cases x 3 slices
    case = oasis.samples[0].case
    assert {s.case for s in demo.filter_samples(oasis.samples, f"case:{int(case)}")} == {case}
    assert {s.slice_index for s in demo.filter_samples(oasis.samples, "slice:1-2")} == {1, 2}
    assert demo.filter_samples(oasis.samples, "case:999") == []

    spaced = tmp_path / "spaced"
    make_folder_tree(spaced, test_count=1)
    (spaced / "test" / "test_000.png").rename(spaced / "test" / "26 (19).png")
    assert [s.key for s in demo.filter_samples(demo.load_samples(spaced).samples, "26-19")] == ["test/26 (19).png"]

    folder = demo.load_samples(folder_tree)
    assert folder.layout == "folder" and [s.key for s in demo.filter_samples(folder.samples, "test_004")] == [
        "test/test_004.png"]
    assert folder.get("test_004.png").key == "test/test_004.png"
    twins = tmp_path / "twins"  # one file name in two class folders: the name alone is ambiguous
    make_folder_tree(twins, test_count=0)
    for label in ("A", "B"):
        (twins / "test" / label).mkdir(parents=True)
        Image.fromarray(SLICE).save(twins / "test" / label / "26 (19).png")
    twin_set = demo.load_samples(twins)
    with pytest.raises(demo.DemoError, match="names 2 slices"):
        twin_set.get("26 (19).png")
    assert twin_set.get("B · 26 (19)").key == "test/B/26 (19).png"
    broken = demo.load_samples(tmp_path / "no-such-folder")
    assert broken.layout == "bundled" and "could not be used" in broken.notice


def test_reconstruct(tmp_path):
    bundle = hub.load_bundle(save_tiny_bundle(tmp_path / "b", seed=0))
    result = demo.reconstruct(bundle, brain_slice(256, 256, 2))
    assert result.codes.shape == (64, 64) and result.code_grid.shape == (256, 256, 3)
    assert result.recon.shape == (256, 256) and result.original.shape == (256, 256)
    assert 0 < result.ssim <= 1 and result.psnr > 0
    no_prior = hub.load_bundle(save_tiny_bundle(tmp_path / "vq-only", seed=0, prior=False))
    with pytest.raises(demo.NoModelError):
        demo.reconstruct(None, result.original)
    assert "no PixelCNN prior" in demo.describe_markdown(no_prior)


def test_local_bundle_problems_are_named(tmp_path):
    runs = tmp_path / "runs"
    good = save_tiny_bundle(runs / "good", seed=0)
    assert demo.load_local(str(good), [runs]).prior is not None
    vq_only = save_tiny_bundle(runs / "vq-only", seed=0, prior=False)
    assert "no `pixelcnn/` folder" in demo.describe_markdown(demo.load_local(str(vq_only), [runs]))

    (runs / "gone").symlink_to("best-0001")  # what `cp -r` of a run's best link gives
    copied = runs / "copied"
    copied.mkdir()
    (copied / "vqvae").symlink_to("best-0001")
    (copied / "pixelcnn").symlink_to(good / "pixelcnn")
    half = runs / "half"
    shutil.copytree(good, half)
    (half / "pixelcnn" / "model.safetensors").unlink()
    (half / "pixelcnn" / "model.safetensors").symlink_to("elsewhere.safetensors")
    cases = {"gone": "`{}/gone` is a link to `best-0001`, which does not exist",
             "copied": "`{}/copied/vqvae` is a link to `best-0001`, which does not exist (a copy made with `cp -r`",
             "half": "`{}/half/pixelcnn/model.safetensors` is a link to `elsewhere.safetensors`, which does not",
             "good/vqvae": "`{}/good/vqvae` holds a single vqvae checkpoint, not a bundle: a bundle folder holds "
                           "`vqvae/` and `pixelcnn/`",
             "good/pixelcnn": "holds a single pixelcnn checkpoint",
             "empty": "`{}/empty` has no `vqvae/` folder",
             "missing": "`{}/missing` does not exist"}
    (runs / "empty").mkdir()
    for name, phrase in cases.items():
        with pytest.raises(demo.DemoError) as info:
            demo.load_local(str(runs / name), [runs])
        assert phrase.format(runs) in str(info.value), (name, str(info.value))
    with pytest.raises(hub.HubError, match="not inside an allowed checkpoint folder"):
        demo.load_local(str(tmp_path), [runs])  # nothing outside the roots is looked at


# ----------------------------------------------------------------------------- the app over HTTP


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """app.py launched in-process (offline, tiny models, tiny data set) and a gradio_client.Client for it."""
    import app

    root = tmp_path_factory.mktemp("app")
    checkpoints = save_tiny_bundle(root / "checkpoints", seed=0)
    save_tiny_bundle(checkpoints / "other", seed=1, sampling={"temperature": 0.9, "top_k": None, "top_p": 0.95})
    save_tiny_bundle(root / "outside", seed=2)
    data_dir = make_folder_tree(root / "data", per_class=2, test_count=6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRAINVQ_CACHE", str(root / "cache"))
        mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        mp.setenv("HF_HUB_CACHE", str(root / "hf-cache"))
        settings = app.Settings(data_dir=str(data_dir), checkpoints=checkpoints, offline=True, host="127.0.0.1",
                                port=free_port())
        generator = generation.Generator(frame_seconds=FRAME_SECONDS)
        blocks, url = app.launch(settings, generator=generator, prevent_thread_lock=True, quiet=True)
        try:
            client = Client(url, verbose=False, download_files=str(root / "downloads"))
            yield {"url": url, "client": client, "root": root, "checkpoints": checkpoints, "data": data_dir,
                   "mp": mp, "generator": generator}
        finally:
            blocks.close()
            generator.close()


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def ssim_of(text: str) -> float:
    return float(re.search(r"SSIM ([0-9.]+)", text).group(1))


def test_app_browse_and_reconstruct(served, tmp_path):
    client = served["client"]
    gallery, status = client.predict("", "All", api_name="/browse")
    assert len(gallery) == 6 and "6 of 6 slices" in status
    assert read(gallery[0]["image"]).shape[:2] == (256, 256)
    gallery, status = client.predict("test_002", "All", api_name="/browse")
    assert [item["caption"] for item in gallery] == ["test_002"] and "1 of 6" in status

    original, grid, recon, metrics, notes = client.predict("test/test_002.png", api_name="/reconstruct_sample")
    assert read(original).shape == (256, 256) and read(grid).shape == (256, 256, 3) and read(recon).shape == (256, 256)
    assert 0 < ssim_of(metrics) <= 1 and "PSNR" in metrics and "test_002" in notes

    rgba = np.dstack([np.stack([SLICE] * 3, -1), np.full_like(SLICE, 200)])
    path = write_image(tmp_path / "upload.png", rgba, "RGBA")
    original, grid, recon, metrics, notes = client.predict(handle_file(str(path)), api_name="/reconstruct_upload")
    assert read(recon).shape == (256, 256) and 0 < ssim_of(metrics) <= 1
    assert "transparency" in notes and "centre-padded 176x208" in notes

    *_, metrics, notes = client.predict("test_002", api_name="/reconstruct_sample")  # the caption the gallery shows
    assert 0 < ssim_of(metrics) <= 1 and "test_002" in notes
    *images, metrics, notes = client.predict("../../etc/passwd", api_name="/reconstruct_sample")
    assert images == [None, None, None] and metrics == "" and "No slice has the caption or file name" in notes


def test_app_refuses_bad_uploads(served, tmp_path):
    client = served["client"]
    noise = tmp_path / "noise.png"
    noise.write_bytes(np.random.default_rng(1).bytes(4096))
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n%%EOF\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path, phrase in [(noise, "not an image"), (pdf, "not an image"), (empty, "empty")]:
        *images, metrics, notes = client.predict(handle_file(str(path)), api_name="/reconstruct_upload")
        assert images == [None, None, None] and metrics == "", notes
        assert notes.startswith("**Cannot use this upload:**") and phrase in notes and "Traceback" not in notes


def raw_call(url: str, api_name: str, data: list) -> str:
    """Call an endpoint over plain HTTP (no gradio_client, which would upload local paths itself)."""
    with httpx.Client(timeout=30) as http:
        event = http.post(f"{url.rstrip('/')}/gradio_api/call/{api_name}", json={"data": data}).json()["event_id"]
        return http.get(f"{url.rstrip('/')}/gradio_api/call/{api_name}/{event}").text


def test_app_upload_cannot_name_server_files(served):
    """A FileData path naming a file on the server (not uploaded) is refused before the app sees it."""
    for target in (served["data"] / "test" / "test_000.png", Path("/etc/passwd")):
        payload = [{"path": str(target), "meta": {"_type": "gradio.FileData"}}]
        stream = raw_call(served["url"], "reconstruct_upload", payload)
        assert "event: error" in stream and "SSIM" not in stream and "Uploaded image" not in stream, stream
    ok = raw_call(served["url"], "reconstruct_sample", ["test/test_001.png"])  # the same route works otherwise
    assert "event: complete" in ok and "SSIM" in ok


def test_app_generate_streams_the_live_view_then_images(served):
    client = served["client"]
    job = client.submit(2, 1.0, 0, 1.0, 11, api_name="/generate")
    job.result(timeout=120)
    outputs = job.outputs()
    statuses = [out[2] for out in outputs]
    intermediate = [out for out in outputs if "Sampling codes" in out[2]]
    assert len(intermediate) >= 3, statuses
    assert len({read(out[0]).tobytes() for out in intermediate}) == len(intermediate)  # the view fills in
    assert all(out[1] in (None, []) for out in intermediate)
    view, images, status = outputs[-1]
    assert status.startswith("Done: 2 sample(s)") and len(images) == 2
    assert read(images[0]["image"]).shape[:2] == (256, 256)
    assert read(view).shape == (256, 2 * (256 + 2 + 256) + 8, 3)  # two pairs: codes | decoded
    with pytest.raises(AppError, match="greater than maximum value 2"):  # the slider's own bound check
        client.predict(1, 2.5, 0, 1.0, 0, api_name="/generate")
    view, images, status = client.predict(1, 1.0, 99, 1.0, 0, api_name="/generate")
    assert view is None and not images and "Top-k must be between 0 (off) and K = 16" in status


def test_app_drops_a_client_that_disconnects(served):
    """A client that goes away mid-run is dropped from the shared sampler like a Stop: its positions stop."""
    url, generator = served["url"].rstrip("/"), served["generator"]
    with httpx.Client(timeout=30) as http:
        event = http.post(f"{url}/gradio_api/call/generate", json={"data": [16, 1.0, 0, 1.0, 5]}).json()["event_id"]
        with http.stream("GET", f"{url}/gradio_api/call/generate/{event}") as stream:
            frames = 0
            for line in stream.iter_lines():
                frames += line.startswith("event: generating")
                if frames == 2:
                    break
    job = next(job for job in generator.jobs if job.request.seed == 5)
    for _ in range(100):
        if job.request.cancelled and job not in generator.jobs:
            break
        time.sleep(0.05)
    assert job.request.cancelled and not job.request.done and job not in generator.jobs
    filled = job.request.filled
    time.sleep(0.5)
    assert job.request.filled == filled < 4096


def test_app_models_tab(served):
    client, root, checkpoints = served["client"], served["root"], served["checkpoints"]
    info, _notice = client.predict(api_name="/model_info")
    assert "codes (K) | 16" in info and "code grid | 64x64" in info and "Offline" in str(_notice)
    start = info

    assert client.predict(api_name="/sampling_defaults") == (1.0, 0, 1.0)   # a prior without chosen defaults

    status, info, _ = client.predict(str(checkpoints / "other"), api_name="/load_local")
    assert status.startswith("**Loaded**") and "other" in info and info != start
    other = info
    assert client.predict(api_name="/sampling_defaults") == (0.9, 0, 0.95)  # the Generate tab starts from these

    status, info, _ = client.predict(str(root / "outside"), api_name="/load_local")
    assert status.startswith("**Load failed:**") and "not inside an allowed checkpoint folder" in status
    assert info == other
    status, info, _ = client.predict("/etc", api_name="/load_local")
    assert status.startswith("**Load failed:**") and info == other
    status, info, _ = client.predict(str(checkpoints / "no-such-bundle"), api_name="/load_local")
    assert status.startswith("**Load failed:**") and "previous models are still in use" in status and info == other

    mp = served["mp"]
    mp.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there; --offline is startup only
    try:
        status, info, _ = client.predict("someone/brainvq", "main", api_name="/load_hub")
        assert status.startswith("**Load failed:**") and "cannot reach the Hugging Face Hub" in status and info == other
        status, info, _ = client.predict("not a repo id", "main", api_name="/load_hub")
        assert "not a valid Hugging Face repository id" in status and info == other
    finally:
        mp.delenv("HF_ENDPOINT")
    status, info, _ = client.predict(str(checkpoints), api_name="/load_local")  # back to the start for the others
    assert status.startswith("**Loaded**") and "codes (K) | 16" in info


def test_app_file_route_serves_no_local_files(served):
    url = served["url"].rstrip("/")
    data_file = served["data"] / "test" / "test_000.png"
    assert data_file.is_file()
    targets = ["/etc/passwd", str(data_file), str(served["checkpoints"] / "vqvae" / "config.json"),
               str(Path(demo.SAMPLES_DIR) / "README.md")]
    served_image = Client(url, verbose=False, download_files=False).predict("test/test_000.png",
                                                                           api_name="/reconstruct_sample")[0]
    with httpx.Client(timeout=10) as http:
        assert http.get(served_image["url"]).status_code == 200  # the route works for the app's own outputs
        assert "/gradio_api/file=" in served_image["url"]
        for target in targets:
            for route in (f"{url}/gradio_api/file={target}", f"{url}/file={target}"):
                response = http.get(route)
                assert response.status_code != 200 or b"root:" not in response.content, route
                assert response.status_code in (403, 404, 400), (route, response.status_code)


def test_app_serves_16_users_at_once(served):
    """16 sessions submit at the same moment (12 reconstructions, 4 generations): every one is answered."""
    users = [Client(served["url"], verbose=False, download_files=False) for _ in range(16)]  # no image downloads
    jobs = [user.submit(f"test/test_{i % 6:03d}.png", api_name="/reconstruct_sample")
            for i, user in enumerate(users[:12])]
    jobs += [user.submit(1, 1.0, 0, 1.0, i, api_name="/generate") for i, user in enumerate(users[12:])]
    results = [job.result(timeout=120) for job in jobs]
    assert all(0 < ssim_of(result[3]) <= 1 for result in results[:12])
    assert all(result[2].startswith("Done: 1 sample(s)") for result in results[12:])


# ----------------------------------------------------------------------------- Anomaly and Complete tabs


def test_app_anomaly_tab(served, tmp_path):
    from test_anomaly import calibrate_tiny_bundle

    client, checkpoints = served["client"], served["checkpoints"]
    key = demo.load_samples(served["data"]).samples[0].key          # the app's first test slice
    *_, summary, status = client.predict(key, "none", "medium", 0, api_name="/anomaly")
    assert "no anomaly calibration" in status and "bench/anomaly.py" in status and summary == ""
    calibrated = calibrate_tiny_bundle(save_tiny_bundle(checkpoints / "calibrated", seed=0))
    client.predict(str(calibrated), api_name="/load_local")
    try:
        original, nll, restored, overlay, summary, status = client.predict(key, "none", "medium", 0,
                                                                           api_name="/anomaly")
        assert status == "Done." and "Image score" in summary and "healthy validation slice" in summary
        for path in (original, nll, restored, overlay):
            assert read(path).shape == (256, 256, 3)
        *_, summary, status = client.predict(key, "dark", "large", 3, api_name="/anomaly")
        assert status == "Done." and "Synthetic lesion: dark, large" in summary
        upload = write_image(tmp_path / "slice.png", SLICE)
        *_, summary, status = client.predict(handle_file(str(upload)), "none", "medium", 0,
                                             api_name="/anomaly_upload")
        assert status == "Done." and "Image score" in summary
        text = tmp_path / "notes.png"
        text.write_bytes(b"not an image at all")
        *_, status = client.predict(handle_file(str(text)), "none", "medium", 0, api_name="/anomaly_upload")
        assert "Cannot use this upload" in status and "not an image" in status
    finally:
        client.predict(str(checkpoints), api_name="/load_local")      # back to the start for the others


def test_app_complete_tab(served, tmp_path):
    client = served["client"]
    key = demo.load_samples(served["data"]).samples[0].key
    original, kept, gallery, status = client.predict(key, "top rows", 0.5, 96, 64, 160, 192, 3, 1.0, 5,
                                                     api_name="/complete")
    assert status.startswith("Done: 3 completion(s)") and len(gallery) == 3
    assert read(original).shape[:2] == (256, 256) and read(kept).shape == (256, 256, 3)
    top = read(gallery[0]["image"])[:128]
    _, _, again, _ = client.predict(key, "top rows", 0.5, 96, 64, 160, 192, 3, 1.0, 5, api_name="/complete")
    assert np.array_equal(read(again[0]["image"]), read(gallery[0]["image"]))   # seeded
    assert top.shape[0] == 128
    *_, gallery, status = client.predict(handle_file(str(write_image(tmp_path / "s.png", SLICE))), "outside a box",
                                         0.5, 96, 64, 160, 192, 2, 0.5, 1, api_name="/complete_upload")
    assert status.startswith("Done: 2 completion(s)") and len(gallery) == 2
    *_, gallery, status = client.predict(key, "outside a box", 0.5, 160, 64, 96, 192, 2, 1.0, 0, api_name="/complete")
    assert "Cannot complete" in status and "box must satisfy" in status and gallery == []

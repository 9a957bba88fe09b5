"""brainvq.hub against a fake Hugging Face Hub served by the test itself on 127.0.0.1 (no other address is contacted).

The fake hub implements what huggingface_hub 2.4 asks of a Hub for these calls:
  * GET /api/models/{owner}/{name}/revision/{revision} (model_info: sha, siblings) and .../tree/{revision}
    (list_repo_tree, used by snapshot_download); errors carry X-Error-Code like the real Hub.
  * HEAD/GET /{owner}/{name}/resolve/{revision}/{path}: X-Repo-Commit, ETag, Content-Length headers; errors carry
    X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound like the real Hub.
  * POST /api/repos/create, POST /api/models/{owner}/{name}/preupload/{revision} (every file "regular", so no
    LFS/Xet storage is needed) and POST /api/models/{owner}/{name}/commit/{revision} (ndjson, base64 files).
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import constants

from brainvq import hub
from brainvq.checkpoint import CheckpointError
from brainvq.hub import HubError
from brainvq.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.vqvae import VQVAE, VQVAEConfig

REPO = "brainvq/tiny-bundle"
KAGGLE_DATA = {"root": "/work/shared/data/alzheimer4class", "layout": "folder", "split_seed": 0,
               "n_train": 4609, "n_val": 512}
VQ_METRICS = {"val_ssim": 0.9797, "epoch": 4}
PRIOR_METRICS = {"val_bits_per_code": 3.25, "val_accuracy": 0.41, "unigram_bits_per_code": 6.5, "epoch": 3}
BUNDLE_FILES = ("vqvae/config.json", "vqvae/model.safetensors", "pixelcnn/config.json", "pixelcnn/model.safetensors")


# ----------------------------------------------------------------------------------------- network guard


def _is_loopback(host) -> bool:
    if host in ("localhost", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch, tmp_path):
    """Refuse any connection or DNS lookup that is not loopback; give huggingface_hub a private cache and no token."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    violations: list[str] = []  # also checked at teardown: the code under test may swallow the error

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            violations.append(f"connect {address!r}")
            raise ConnectionRefusedError(f"test network guard: {address!r} is not loopback")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host.decode() if isinstance(host, bytes) else host):
            violations.append(f"resolve {host!r}")
            raise socket.gaierror(f"test network guard: {host!r} is not loopback")
        return real_getaddrinfo(host, *args, **kwargs)

    # conftest.py turns off huggingface_hub's telemetry, which would fetch {import-time HF_ENDPOINT}/api/...
    assert constants.HF_HUB_DISABLE_TELEMETRY
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # what HF_HUB_OFFLINE set when huggingface_hub loaded
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "BRAINVQ_HUB_REPO"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # read now by hf_xet (push) and brainvq.hub
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "hf-home" / "xet"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: tests that need a hub set their own
    yield
    assert violations == [], f"the test reached beyond 127.0.0.1: {violations}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------- fake hub


class FakeHub:
    """An in-memory Hub: repos -> refs (branch/tag -> commit) and commits (sha -> {path: bytes})."""

    def __init__(self):
        self.refs: dict[str, dict[str, str]] = {}
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.model_cards: list[str] = []
        self.web_server: int | None = None  # answer every request like a plain web server: 404 or 200 HTML
        self.down = False  # answer 503 to every download, like a Hub outage
        self.lock = threading.Lock()
        hub_ref = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output quiet
                pass

            def do_HEAD(self):
                hub_ref.handle(self, "HEAD")

            def do_GET(self):
                hub_ref.handle(self, "GET")

            def do_POST(self):
                hub_ref.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # -- state

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", replace: bool = False) -> str:
        """Add a commit on ``branch`` holding the previous files plus ``files`` (or only ``files``)."""
        with self.lock:
            commits = self.commits.setdefault(repo_id, {})
            refs = self.refs.setdefault(repo_id, {})
            parent = {} if replace or branch not in refs else commits[refs[branch]]
            tree = {**parent, **files}
            sha = hashlib.sha1(repr((repo_id, len(commits), sorted(tree))).encode()
                               + b"".join(tree[k] for k in sorted(tree))).hexdigest()
            commits[sha] = tree
            refs[branch] = sha
            return sha

    def add_repo(self, repo_id: str, folder: Path, files=BUNDLE_FILES,
                 overrides: dict[str, bytes] | None = None) -> str:
        """Publish ``files`` of a local bundle folder on main; ``overrides`` maps paths to replacement contents."""
        content = {name: (folder / name).read_bytes() for name in files}
        content.update(overrides or {})
        return self.commit(repo_id, content, replace=True)

    def requests(self, method: str | None = None) -> list[str]:
        return [path for m, path, _ in self.log if method in (None, m)]

    # -- HTTP

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(req.path)
        self.log.append((method, req.path, dict(req.headers)))
        parts = url.path.split("/")
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        if self.web_server:
            return self.reply(req, self.web_server, body=b"<html><body>Not a Hub</body></html>",
                              headers={"Content-Type": "text/html"}, head=method == "HEAD")
        if method == "GET" and len(parts) >= 7 and parts[:3] == ["", "api", "models"] and parts[5] in ("revision",
                                                                                                     "tree"):
            return self.api(req, f"{unquote(parts[3])}/{unquote(parts[4])}", parts[5], unquote("/".join(parts[6:])))
        if method in ("HEAD", "GET") and len(parts) >= 6 and parts[3] == "resolve":
            return self.resolve(req, method, f"{unquote(parts[1])}/{unquote(parts[2])}", unquote(parts[4]),
                                unquote("/".join(parts[5:])))
        if method == "POST" and url.path == "/api/repos/create":
            return self.create_repo(req, json.loads(body))
        if method == "POST" and url.path == "/api/validate-yaml":
            return self.validate_yaml(req, json.loads(body))
        if method == "POST" and len(parts) >= 7 and parts[:2] == ["", "api"] and parts[2] == "models":
            repo_id = f"{unquote(parts[3])}/{unquote(parts[4])}"
            action, revision = parts[5], unquote("/".join(parts[6:]))
            if repo_id not in self.refs:
                return self.reply(req, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if action == "preupload":
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                         for f in json.loads(body)["files"]]
                return self.reply(req, 200, {"files": files, "commitOid": self.refs[repo_id].get(revision)})
            if action == "commit":
                return self.create_commit(req, repo_id, revision, body)
        return self.reply(req, 404, {"error": f"not implemented: {method} {url.path}"})

    def reply(self, req, status: int, payload=None, headers=None, body: bytes | None = None, head: bool = False):
        data = body if body is not None else json.dumps(payload or {}).encode()
        req.send_response(status)
        for key, value in (headers or {}).items():
            req.send_header(key, value)
        if body is None:
            req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if not head:
            req.wfile.write(data)

    def lookup(self, req, repo_id: str, revision: str, head: bool = False) -> str | None:
        """The commit of ``revision``, or None after answering the error the real Hub would."""
        if self.down:
            return self.reply(req, 503, {"error": "Service Unavailable"}, head=head)
        if repo_id not in self.refs:  # the real Hub answers 401 for unknown (or private) repos
            return self.reply(req, 401, {"error": "Repository not found"},
                              {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, head=head)
        commit = self.refs[repo_id].get(revision, revision if revision in self.commits[repo_id] else None)
        if commit is None:
            return self.reply(req, 404, {"error": "Invalid rev id"},
                              {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, head=head)
        return commit

    def api(self, req, repo_id: str, action: str, revision: str) -> None:
        """model_info (siblings) and the recursive tree listing: every file at the root of the listing."""
        commit = self.lookup(req, repo_id, revision)
        if commit is None:
            return
        tree = self.commits[repo_id][commit]
        if action == "revision":
            return self.reply(req, 200, {"id": repo_id, "sha": commit, "private": False,
                                         "siblings": [{"rfilename": name} for name in tree]})
        self.reply(req, 200, [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                              for name, data in tree.items()])

    def resolve(self, req, method: str, repo_id: str, revision: str, filename: str) -> None:
        head = method == "HEAD"
        commit = self.lookup(req, repo_id, revision, head)
        if commit is None:
            return
        tree = self.commits[repo_id][commit]
        if filename not in tree:
            return self.reply(req, 404, {"error": "Entry not found"},
                              {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                               "X-Repo-Commit": commit}, head=head)
        data = tree[filename]
        etag = hashlib.sha256(data).hexdigest()
        headers = {"ETag": f'"{etag}"', "Content-Type": "application/octet-stream", "X-Repo-Commit": commit}
        self.reply(req, 200, headers=headers, body=data, head=head)

    def create_repo(self, req, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = {"url": f"{self.endpoint}/{repo_id}"}
        if repo_id in self.refs:
            return self.reply(req, 409, {"error": "You already created this model repo", **url})
        self.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        self.reply(req, 200, url)

    def validate_yaml(self, req, payload: dict) -> None:
        """Like the Hub: the README's front matter must be a YAML mapping; a 400 lists the errors."""
        content = payload["content"]
        self.model_cards.append(content)
        try:
            meta = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else {}
            errors = [] if isinstance(meta, dict) else ["front matter is not a mapping"]
        except yaml.YAMLError as error:
            errors = [str(error)]
        status = 400 if errors else 200
        self.reply(req, status, {"errors": [{"message": e} for e in errors], "warnings": []})

    def create_commit(self, req, repo_id: str, revision: str, body: bytes) -> None:
        files: dict[str, bytes] = {}
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                assert item["value"]["encoding"] == "base64"
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] != "header":
                return self.reply(req, 400, {"error": f"fake hub: unsupported commit item {item['key']}"})
        sha = self.commit(repo_id, files, branch=revision)
        self.reply(req, 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                              "success": True})


@pytest.fixture
def fake_hub(monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    yield server
    server.close()


# ----------------------------------------------------------------------------------------- tiny models


def tiny_models(seed: int = 0) -> tuple[VQVAE, GatedPixelCNN]:
    torch.manual_seed(seed)
    vq = VQVAE(VQVAEConfig(num_codes=16, code_dim=8, widths=(8, 8), res_width=8, num_res_blocks=1)).eval()
    prior = GatedPixelCNN(PixelCNNConfig(num_codes=16, grid_size=64, channels=8, embed_dim=8, num_layers=2,
                                         pos_dim=2, head_channels=8)).eval()
    return vq, prior


def save_bundle(folder: Path, vq: VQVAE, prior: GatedPixelCNN | None) -> Path:
    vq.save(folder / "vqvae", data=KAGGLE_DATA, metrics=VQ_METRICS)
    if prior is not None:
        prior.save(folder / "pixelcnn", vq.fingerprint(), data=KAGGLE_DATA, metrics=PRIOR_METRICS)
    return folder


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, models) -> Path:
    return save_bundle(tmp_path_factory.mktemp("bundle"), *models)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 1, 256, 256)


def assert_same_outputs(bundle: hub.ModelBundle, vq: VQVAE, prior: GatedPixelCNN | None, images: torch.Tensor):
    with torch.no_grad():
        codes = vq.encode(images)
        assert torch.equal(bundle.vqvae.encode(images), codes)
        assert torch.equal(bundle.vqvae.decode(codes), vq.decode(codes))
        if prior is not None:
            assert torch.equal(bundle.prior(codes), prior(codes))
    assert bundle.vqvae.fingerprint() == vq.fingerprint()


# ----------------------------------------------------------------------------------------- download + load


def test_download_and_load_from_the_fake_hub(fake_hub, bundle_dir, models, images, tmp_path):
    commit = fake_hub.add_repo(REPO, bundle_dir)
    bundle = hub.load_from_hub(REPO, cache_dir=tmp_path / "cache")
    assert_same_outputs(bundle, *models, images)
    assert bundle.source == f"Hub: {REPO}@main (commit {commit[:7]})"
    assert bundle.notice is None and bundle.folder.name == commit
    assert bundle.folder.is_relative_to(tmp_path / "cache")
    fetched = {path.split("/resolve/")[1].split("/", 1)[1] for path in fake_hub.requests("GET") if "/resolve/" in path}
    assert fetched == set(BUNDLE_FILES)
    info = bundle.describe()
    assert (info["K"], info["D"], info["grid_size"], info["has_prior"]) == (16, 8, 64, True)
    assert info["metrics"] == {"vqvae": VQ_METRICS, "pixelcnn": PRIOR_METRICS}
    assert info["data"] == KAGGLE_DATA and info["source"] == bundle.source
    assert info["vqvae_params"] > 16 * 8 and info["prior_params"] == sum(p.numel() for p in models[1].parameters())

    # A tag or a commit hash works too, and gives the same snapshot folder.
    fake_hub.refs[REPO]["v1.0"] = commit
    assert hub.load_from_hub(REPO, "v1.0", cache_dir=tmp_path / "cache").folder == bundle.folder
    assert hub.load_from_hub(REPO, commit, cache_dir=tmp_path / "cache").folder == bundle.folder


def test_a_bundle_without_a_prior_loads_for_reconstruction(fake_hub, bundle_dir, models, images, tmp_path):
    fake_hub.add_repo(REPO, bundle_dir, files=BUNDLE_FILES[:2])
    bundle = hub.load_from_hub(REPO, cache_dir=tmp_path / "cache")
    assert bundle.prior is None
    assert_same_outputs(bundle, models[0], None, images)
    assert bundle.describe()["prior_params"] is None


def test_the_default_cache_follows_hf_hub_cache_at_call_time(fake_hub, bundle_dir, tmp_path, monkeypatch):
    fake_hub.add_repo(REPO, bundle_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "late-cache"))
    assert hub.load_from_hub(REPO).folder.is_relative_to(tmp_path / "late-cache")


@pytest.mark.parametrize("case, expected", [
    ("repo", "model repository 'brainvq/missing' was not found on http://127.0.0.1"),
    ("revision", "has no revision 'no-such-branch'"),
    ("file", "has no file 'vqvae/model.safetensors'"),
    ("prior-weights", "has no file 'pixelcnn/model.safetensors'"),
])
def test_missing_repo_revision_or_file_is_a_clear_hub_error(fake_hub, bundle_dir, tmp_path, case, expected):
    fake_hub.add_repo(REPO, bundle_dir, files=BUNDLE_FILES[:1] if case == "file" else
                      BUNDLE_FILES[:3] if case == "prior-weights" else BUNDLE_FILES)
    repo = "brainvq/missing" if case == "repo" else REPO
    revision = "no-such-branch" if case == "revision" else "main"
    started = time.monotonic()
    with pytest.raises(HubError, match=expected):
        hub.load_from_hub(repo, revision, cache_dir=tmp_path / "cache")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("status", [404, 200])
def test_an_endpoint_that_is_not_a_hub_is_named(fake_hub, bundle_dir, tmp_path, status):
    fake_hub.add_repo(REPO, bundle_dir)
    fake_hub.web_server = status  # a plain web server: a 404 page, or the same HTML page for every path
    with pytest.raises(HubError, match=f"^{fake_hub.endpoint} does not answer like a Hugging Face Hub.*HF_ENDPOINT"):
        hub.load_from_hub(REPO, cache_dir=tmp_path / "cache")


def test_a_truncated_download_is_a_checkpoint_error_naming_the_file(fake_hub, bundle_dir, tmp_path):
    weights = (bundle_dir / "vqvae/model.safetensors").read_bytes()
    fake_hub.add_repo(REPO, bundle_dir, overrides={"vqvae/model.safetensors": weights[: len(weights) // 2]})
    with pytest.raises(CheckpointError, match=r"vqvae/model\.safetensors.*not a readable safetensors file") as info:
        hub.load_from_hub(REPO, cache_dir=tmp_path / "cache")
    assert f"downloaded from the Hugging Face Hub: {REPO}@main" in str(info.value)


def test_a_corrupt_hub_bundle_falls_back_to_the_bundled_weights(fake_hub, bundle_dir, models, images, tmp_path):
    fake_hub.add_repo(REPO, bundle_dir, overrides={"pixelcnn/config.json": b"{not json"})
    bundle = hub.load_default(REPO, fallback=bundle_dir)
    assert_same_outputs(bundle, *models, images)
    assert bundle.notice.startswith(f"Could not load {REPO}@main from the Hugging Face Hub (")
    assert "is not valid JSON" in bundle.notice and bundle.source.startswith("local folder: ")


# ----------------------------------------------------------------------------------------- unreachable / offline


def test_unreachable_hub_falls_back_to_the_bundled_folder(bundle_dir, models, images, monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    started = time.monotonic()
    bundle = hub.load_default(REPO, "main", fallback=bundle_dir)
    assert time.monotonic() - started < 5
    assert_same_outputs(bundle, *models, images)
    assert bundle.notice == (f"The Hugging Face Hub at {endpoint} is unreachable, so the bundled {bundle_dir} weights "
                             "are in use. Start the app with --offline to skip the Hub.")  # no raw "[Errno ...]"
    with pytest.raises(HubError, match=f"^cannot reach the Hugging Face Hub at {endpoint}; check the network") as info:
        hub.load_from_hub(REPO)
    assert info.value.kind == "unreachable" and "Errno" not in str(info.value)


def test_unreachable_hub_reuses_a_complete_cached_download(fake_hub, bundle_dir, models, images, tmp_path,
                                                           monkeypatch):
    fake_hub.add_repo(REPO, bundle_dir)
    first = hub.load_from_hub(REPO, cache_dir=tmp_path / "cache")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    again = hub.load_from_hub(REPO, cache_dir=tmp_path / "cache")  # snapshot_download falls back to the cache
    assert again.folder == first.folder and again.source == first.source
    assert_same_outputs(again, *models, images)


def test_a_hub_outage_uses_the_cache_or_says_what_failed(fake_hub, bundle_dir, tmp_path):
    fake_hub.add_repo(REPO, bundle_dir)
    fake_hub.down = True
    with pytest.raises(HubError, match="answered HTTP 503 for brainvq/tiny-bundle@main; try again later"):
        hub.load_from_hub(REPO, cache_dir=tmp_path / "cache")
    fake_hub.down = False
    first = hub.load_from_hub(REPO, cache_dir=tmp_path / "cache")
    fake_hub.down = True
    assert hub.load_from_hub(REPO, cache_dir=tmp_path / "cache").folder == first.folder


def test_a_cached_bundle_without_prior_is_reused_when_unreachable(fake_hub, bundle_dir, models, images, tmp_path,
                                                                  monkeypatch):
    fake_hub.add_repo(REPO, bundle_dir, files=BUNDLE_FILES[:2])
    hub.load_from_hub(REPO, cache_dir=tmp_path / "cache")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    bundle = hub.load_from_hub(REPO, cache_dir=tmp_path / "cache")
    assert bundle.prior is None and bundle.source.startswith(f"Hub: {REPO}@main (commit ")
    assert_same_outputs(bundle, models[0], None, images)


def test_an_incomplete_cache_is_not_used(fake_hub, bundle_dir, tmp_path, monkeypatch):
    fake_hub.add_repo(REPO, bundle_dir)
    hub.load_from_hub(REPO, cache_dir=tmp_path / "cache")
    for blob in (tmp_path / "cache").rglob("pixelcnn/model.safetensors"):
        blob.unlink()  # as if that download had been interrupted
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(HubError, match="cannot reach the Hugging Face Hub"):
        hub.load_from_hub(REPO, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "local_files_only"])
def test_offline_mode_skips_the_hub(fake_hub, bundle_dir, models, images, tmp_path, monkeypatch, switch):
    fake_hub.add_repo(REPO, bundle_dir)
    other_vq, other_prior = tiny_models(seed=3)
    fallback = save_bundle(tmp_path / "fallback", other_vq, other_prior)
    if switch == "HF_HUB_OFFLINE":  # the environment variable as huggingface_hub read it at import
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = switch == "local_files_only"
    bundle = hub.load_default(REPO, fallback=fallback, offline=offline)
    assert_same_outputs(bundle, other_vq, other_prior, images)
    assert bundle.notice == (f"Offline mode: {REPO}@main is not in the download cache, so the bundled {fallback} "
                             "weights are in use.")
    with pytest.raises(HubError, match="^offline mode is on and brainvq/tiny-bundle@main is not"):
        hub.load_from_hub(REPO, local_files_only=offline)
    assert fake_hub.log == []

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # download once, then offline uses the cached copy
    hub.load_from_hub(REPO)
    fake_hub.log.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", switch == "HF_HUB_OFFLINE")
    bundle = hub.load_default(REPO, fallback=fallback, offline=offline)
    assert_same_outputs(bundle, *models, images)
    assert bundle.source.startswith(f"Hub: {REPO}@main (commit ") and bundle.notice is None and fake_hub.log == []


def test_default_repo_comes_from_the_environment(fake_hub, bundle_dir, tmp_path, monkeypatch):
    fake_hub.add_repo("someone/else", bundle_dir)
    monkeypatch.setenv("BRAINVQ_HUB_REPO", "someone/else")
    assert hub.load_default(fallback=tmp_path / "nothing").source.startswith("Hub: someone/else@main")
    monkeypatch.setenv("BRAINVQ_HUB_REPO", "not a repo")
    bundle = hub.load_default(fallback=bundle_dir)
    assert "not a valid Hugging Face repository id" in bundle.notice and fake_hub.requests("HEAD") != []


def test_when_hub_and_fallback_both_fail_the_error_says_both(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(CheckpointError, match=r"(?s)cannot reach the Hugging Face Hub.*bundled weights failed too"):
        hub.load_default(REPO, fallback=tmp_path / "empty")


# ----------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("repo_id", ["brainvq/brainvq-alzheimer-t1", "  owner/name  ", "a/b", "Org_1/model.v2",
                                     "x" * 40 + "/" + "y" * 55, "gpt2", "x" * 48 + "/" + "y" * 48])
def test_validate_repo_id_accepts(repo_id):  # huggingface_hub's rules: a canonical id without owner is valid
    assert hub.validate_repo_id(repo_id) == repo_id.strip()


@pytest.mark.parametrize("repo_id", ["../etc", "a/b/c", "", "   ", "owner/na me", "x" * 200, "/name", "owner/",
                                     "owner/..", "owner/a..b", "owner/a--b", "-owner/name", "owner/name.",
                                     ".owner/name", "owner\n/name", "own\x00er/name", "owner/näme", "owner/name?x=1",
                                     "owner/x.git",
                                     "owner/" + "y" * 97, None])
def test_validate_repo_id_refuses(repo_id):
    with pytest.raises(HubError, match="not a valid Hugging Face repository id"):
        hub.validate_repo_id(repo_id)


@pytest.mark.parametrize("revision, expected", [(None, "main"), ("", "main"), ("main", "main"), ("v1.0", "v1.0"),
                                                ("refs/pr/1", "refs/pr/1"), ("feature/x-2", "feature/x-2"),
                                                ("a" * 40, "a" * 40),
                                                ("0123456789abcdef0123456789abcdef01234567",) * 2])
def test_validate_revision_accepts(revision, expected):
    assert hub.validate_revision(revision) == expected


@pytest.mark.parametrize("revision", ["../../x", "main/../x", "ma in", "ma\nin", "tab\there", "\x7f", "/main",
                                      "main/", "a//b", "x" * 129, "main~1", "HEAD^", "a:b", "a*", "x.lock", ".hidden",
                                      "a\\b", "@{u}"])
def test_validate_revision_refuses(revision):
    with pytest.raises(HubError, match="not a valid revision"):
        hub.validate_revision(revision)


def test_invalid_ids_never_reach_the_network(fake_hub):
    for bad in ("../etc", "a/b/c"):
        with pytest.raises(HubError):
            hub.load_from_hub(bad)
    with pytest.raises(HubError):
        hub.load_from_hub(REPO, "../../x")
    assert fake_hub.log == []


# ----------------------------------------------------------------------------------------- one model, the Hub's way


def test_a_model_saves_and_loads_the_hub_way(images, tmp_path):
    vq, prior = tiny_models(seed=7)
    folder = vq.save(tmp_path / "vq", data=KAGGLE_DATA, metrics=VQ_METRICS)  # save_pretrained + these config entries
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["kind"], config["fingerprint"], config["metrics"]) == ("vqvae", vq.fingerprint(), VQ_METRICS)
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "pytorch" and "pytorch_model_hub_mixin" in front["tags"]
    assert "# BrainVQ: VQ-VAE for brain MRI slices" in card and "research and teaching, not for diagnosis" in card
    assert "| VQ-VAE | `val_ssim` | 0.9797 |" in card and 'VQVAE.from_pretrained("OWNER/NAME")' in card
    for name in (folder, str(folder)):  # a Path or an existing folder is always local
        loaded = VQVAE.from_pretrained(name)
        assert torch.equal(loaded.encode(images), vq.encode(images)) and loaded.meta["metrics"] == VQ_METRICS

    prior.save(tmp_path / "prior", vq.fingerprint())
    assert torch.equal(GatedPixelCNN.from_pretrained(tmp_path / "prior", vqvae=vq)(vq.encode(images)),
                       prior(vq.encode(images)))
    with pytest.raises(CheckpointError, match="was trained on VQ-VAE"):
        GatedPixelCNN.from_pretrained(tmp_path / "prior", vqvae=tiny_models(seed=8)[0])


def test_a_model_pushed_with_push_to_hub_loads_with_from_pretrained(fake_hub, images, tmp_path, monkeypatch):
    vq, prior = tiny_models(seed=7)
    vq.save(tmp_path / "vq", metrics=VQ_METRICS)
    prior.save(tmp_path / "prior", vq.fingerprint())
    with monkeypatch.context() as patch:  # push_to_hub's HfApi() takes the endpoint huggingface_hub read at import
        patch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
        vq.push_to_hub("me/vq", token="hf_fake_token")
        prior.push_to_hub("me/prior", token="hf_fake_token")
    for repo in ("me/vq", "me/prior"):
        head = fake_hub.refs[repo]["main"]
        assert set(fake_hub.commits[repo][head]) == {".gitattributes", "README.md", "config.json", "model.safetensors"}
    download = {"endpoint": fake_hub.endpoint, "cache_dir": tmp_path / "cache"}
    loaded = VQVAE.from_pretrained("me/vq", **download)
    assert torch.equal(loaded.encode(images), vq.encode(images)) and loaded.meta["metrics"] == VQ_METRICS
    codes = vq.encode(images)
    assert torch.equal(GatedPixelCNN.from_pretrained("me/prior", vqvae=loaded, **download)(codes), prior(codes))


def test_weights_are_never_unpickled_from_the_hub(fake_hub, bundle_dir, tmp_path):
    pickled = {"config.json": (bundle_dir / "vqvae/config.json").read_bytes(), "pytorch_model.bin": b"PK\x03\x04..."}
    fake_hub.commit("me/pickled", pickled)
    with pytest.raises(CheckpointError, match=r"model\.safetensors' is missing"):
        VQVAE.from_pretrained("me/pickled", endpoint=fake_hub.endpoint, cache_dir=tmp_path / "cache")
    assert not [path for path in fake_hub.requests() if path.endswith("pytorch_model.bin")]  # not even downloaded


def test_the_shipped_checkpoints_load_as_they_are(images):
    bundle = hub.load_bundle(hub.BUNDLED_DIR)  # checkpoints/ as committed, with its pairing check
    assert bundle.prior is not None and bundle.vqvae.meta["fingerprint"] == bundle.vqvae.fingerprint()
    assert bundle.prior.meta["vqvae_fingerprint"] == bundle.vqvae.fingerprint()
    again = VQVAE.from_pretrained(str(hub.BUNDLED_DIR / "vqvae"))
    assert torch.equal(again.encode(images[:1]), bundle.vqvae.encode(images[:1]))
    # the anomaly calibration and the upload check's limits hold for the shipped scoring prior (anomaly/prior)
    from brainvq import anomaly, slicecheck
    assert bundle.scoring_prior is not None
    assert anomaly.Detector.load(hub.BUNDLED_DIR, bundle.vqvae, bundle.scorer).calibration is not None
    assert slicecheck.limits_for(bundle.folder, bundle.vqvae, bundle.scorer)[0] is not None


# ----------------------------------------------------------------------------------------- local folders


@pytest.fixture
def roots(tmp_path, bundle_dir):
    allowed = tmp_path / "allowed"
    (allowed / "run1").mkdir(parents=True)
    for sub in ("vqvae", "pixelcnn"):
        (allowed / "run1" / sub).symlink_to(bundle_dir / sub)
    outside = tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    (allowed / "escape").symlink_to(outside / "secret")
    return allowed, outside


def test_resolve_local_accepts_folders_inside_an_allowed_root(roots, models, images):
    allowed, _ = roots
    assert hub.resolve_local(allowed / "run1", [allowed]) == (allowed / "run1").resolve()
    assert hub.resolve_local(allowed, [allowed]) == allowed.resolve()
    assert hub.resolve_local(str(allowed / "run1" / ".." / "run1"), [allowed]) == (allowed / "run1").resolve()
    assert hub.resolve_local(allowed / "not-yet", [allowed]) == (allowed / "not-yet").resolve()
    bundle = hub.load_local(str(allowed / "run1"), [allowed])
    assert_same_outputs(bundle, *models, images)
    assert bundle.source.startswith("local folder: ") and bundle.folder == (allowed / "run1").resolve()


def test_resolve_local_takes_relative_paths_from_the_project_root():
    assert hub.resolve_local("checkpoints", [hub.BUNDLED_DIR]) == hub.BUNDLED_DIR.resolve()
    assert hub.resolve_local("checkpoints/vqvae", [hub.BUNDLED_DIR]) == (hub.BUNDLED_DIR / "vqvae").resolve()


@pytest.mark.parametrize("attempt", ["dotdot", "relative-dotdot", "absolute", "symlink", "etc", "empty", "nul"])
def test_resolve_local_refuses_escapes(roots, attempt):
    allowed, outside = roots
    folder = {"dotdot": f"{allowed}/../outside/secret", "relative-dotdot": "../../../../../../../etc",
              "absolute": str(outside / "secret"), "symlink": str(allowed / "escape"), "etc": "/etc",
              "empty": "  ", "nul": f"{allowed}/run1\x00"}[attempt]
    with pytest.raises(HubError, match=r"is not inside an allowed checkpoint folder \(allowed: "):
        hub.resolve_local(folder, [allowed])
    with pytest.raises(HubError, match="is not inside an allowed checkpoint folder"):
        hub.load_local(folder, [allowed])


def test_refusal_does_not_reveal_whether_a_path_exists(roots):
    allowed, outside = roots
    messages = []
    for name in ("secret", "no-such-folder"):
        with pytest.raises(HubError) as info:
            hub.resolve_local(outside / name, [allowed])
        messages.append(str(info.value).replace(name, "NAME"))
    assert messages[0] == messages[1]
    with pytest.raises(HubError) as info:
        hub.resolve_local(allowed / "escape", [allowed])
    assert "secret" not in str(info.value) and "outside" not in str(info.value)  # the symlink target stays hidden


# ----------------------------------------------------------------------------------------- export / push


def test_export_writes_the_files_and_an_honest_model_card(bundle_dir, models, images, tmp_path):
    out = hub.export_bundle(tmp_path / "export", bundle_dir / "vqvae", bundle_dir / "pixelcnn", "owner/brainvq-test")
    for name in BUNDLE_FILES:
        assert (out / name).read_bytes() == (bundle_dir / name).read_bytes()
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        ["README.md", *BUNDLE_FILES, "vqvae/README.md", "pixelcnn/README.md"])  # save_pretrained; no temp files left
    assert_same_outputs(hub.load_bundle(out), *models, images)
    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: pytorch" in front and "license: mit" in front
    for tag in ("brainvq", "vq-vae", "pixelcnn", "mri"):
        assert f"- {tag}\n" in front
    assert "| VQ-VAE | `val_ssim` | 0.9797 |" in body and "| PixelCNN | `val_bits_per_code` | 3.2500 |" in body
    assert "Alzheimer's Dataset (4 class of Images)" in body and "6,400 skull-stripped axial T1" in body
    assert "176x208" in body and "OASIS-1" in body and "padded to 256x256" in body
    assert "split **by file** with seed 0 (4,609 training and 512 validation slices)" in body
    assert "**not** trained on the OASIS `keras_png_slices_data` set" in body
    assert 'hub.load_from_hub("owner/brainvq-test")' in body
    assert "BrainVQ is for research and teaching, not for diagnosis or any other clinical use.\n" in body
    assert "/work/shared" not in card  # no local paths in a public card


def test_export_refuses_a_mismatched_pair_and_bad_repo_ids(bundle_dir, tmp_path):
    other_vq, other_prior = tiny_models(seed=5)
    other = save_bundle(tmp_path / "other", other_vq, other_prior)
    with pytest.raises(CheckpointError, match="was trained on VQ-VAE"):
        hub.export_bundle(tmp_path / "out", bundle_dir / "vqvae", other / "pixelcnn", "owner/name")
    with pytest.raises(HubError):
        hub.export_bundle(tmp_path / "out", bundle_dir / "vqvae", None, "not/a/repo")
    assert not (tmp_path / "out").exists()
    hub.export_bundle(tmp_path / "out", bundle_dir / "vqvae", bundle_dir / "pixelcnn", "owner/name")
    with pytest.raises(HubError, match="no prior was given.*stale files"):
        hub.export_bundle(tmp_path / "out", bundle_dir / "vqvae", None, "owner/name")


def test_push_then_load_round_trip_through_the_fake_hub(fake_hub, bundle_dir, models, images, tmp_path):
    out = hub.export_bundle(tmp_path / "export", bundle_dir / "vqvae", bundle_dir / "pixelcnn", "me/pushed")
    (out / "notes.tmp").write_text("not part of the bundle")
    url = hub.push_bundle(out, "me/pushed", token="hf_fake_token")
    head = fake_hub.refs["me/pushed"]["main"]
    assert url == f"{fake_hub.endpoint}/me/pushed/commit/{head}"
    assert set(fake_hub.commits["me/pushed"][head]) == {".gitattributes", "README.md", *BUNDLE_FILES}
    posts = [(path, headers) for method, path, headers in fake_hub.log if method == "POST"]
    assert [path.split("?")[0] for path, _ in posts] == [
        "/api/repos/create", "/api/validate-yaml", "/api/models/me/pushed/preupload/main",
        "/api/models/me/pushed/commit/main"]
    assert fake_hub.model_cards == [(out / "README.md").read_text()]
    assert all(headers.get("authorization") == "Bearer hf_fake_token" for _, headers in posts)
    assert_same_outputs(hub.load_from_hub("me/pushed", cache_dir=tmp_path / "cache"), *models, images)

    # Pushing again to the existing repository is fine (create_repo exist_ok).
    assert hub.main(["push", "--folder", str(out), "--repo-id", "me/pushed", "--token", "hf_fake_token"]) == 0


def test_push_refuses_bad_input_before_any_request(fake_hub, bundle_dir, tmp_path):
    with pytest.raises(HubError):
        hub.push_bundle(bundle_dir, "a/b/c", token="x")
    with pytest.raises(CheckpointError):
        hub.push_bundle(tmp_path / "empty", "me/pushed", token="x")
    assert fake_hub.log == []


def test_push_to_an_unreachable_hub_is_a_hub_error(bundle_dir, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(HubError, match="cannot reach the Hugging Face Hub"):
        hub.push_bundle(bundle_dir, "me/pushed", token="x")


def test_cli_export(bundle_dir, tmp_path, capsys):
    code = hub.main(["export", "--out", str(tmp_path / "cli"), "--vqvae", str(bundle_dir / "vqvae"),
                     "--pixelcnn", str(bundle_dir / "pixelcnn"), "--repo-id", "owner/cli"])
    assert code == 0 and "VQ-VAE + PixelCNN" in capsys.readouterr().out
    assert (tmp_path / "cli" / "README.md").is_file() and (tmp_path / "cli" / "pixelcnn" / "config.json").is_file()
    assert hub.main(["export", "--out", str(tmp_path / "bad"), "--vqvae", str(tmp_path / "none")]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_name_that_is_neither_a_folder_nor_a_reachable_repo_is_a_clear_checkpoint_error(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(CheckpointError, match=r"^'runs/no-such' is no folder here; as a Hub repository: cannot "
                                              f"reach the Hugging Face Hub at {endpoint}"):
        VQVAE.from_pretrained("runs/no-such", endpoint=endpoint, cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------------- anomaly files


@pytest.fixture(scope="module")
def checked_dir(tmp_path_factory) -> Path:
    """A tiny bundle with everything the Anomaly tab and the upload check read: a scoring prior (anomaly/prior,
    other weights than pixelcnn/), the local prior, the calibration and the limits, all measured with the scoring
    prior."""
    from brainvq import anomaly, slicecheck
    from test_anomaly import calibrate_tiny_bundle, slices
    from test_app import save_tiny_bundle

    folder = save_tiny_bundle(tmp_path_factory.mktemp("checked") / "checkpoints", seed=0)
    vq = VQVAE.from_pretrained(folder / "vqvae")
    torch.manual_seed(9)
    GatedPixelCNN(GatedPixelCNN.from_pretrained(folder / "pixelcnn").cfg).save(
        folder / anomaly.ANOMALY_DIR / anomaly.SCORING_DIR, vq.fingerprint())
    calibrate_tiny_bundle(folder)
    bundle = hub.load_bundle(folder)
    rows = slicecheck.features(bundle.vqvae, bundle.scorer, slices(12, seed=200))
    slicecheck.Limits(slicecheck.fit_limits(rows), anomaly.model_fingerprints(bundle.vqvae, bundle.scorer)).save(
        folder / anomaly.ANOMALY_DIR / slicecheck.LIMITS_NAME)
    return folder


def test_a_scoring_prior_judges_slices_and_the_main_prior_samples(checked_dir, bundle_dir):
    """anomaly/prior, when a bundle has one, is the prior of the anomaly maps and the upload check; pixelcnn/ stays
    the prior that samples. Without one, pixelcnn/ does both."""
    from brainvq import anomaly, demo_prior

    bundle = hub.load_bundle(checked_dir)
    scoring = GatedPixelCNN.from_pretrained(checked_dir / "anomaly" / "prior")
    main = GatedPixelCNN.from_pretrained(checked_dir / "pixelcnn")
    assert anomaly.fingerprint(bundle.scorer) == anomaly.fingerprint(scoring) != anomaly.fingerprint(main)
    assert anomaly.fingerprint(bundle.prior) == anomaly.fingerprint(main)
    assert demo_prior.detector_for(bundle).prior is bundle.scorer and demo_prior.detector_for(bundle).calibration
    assert anomaly.fingerprint(anomaly.Detector.load(checked_dir).prior) == anomaly.fingerprint(scoring)
    plain = hub.load_bundle(bundle_dir)
    assert plain.scoring_prior is None and plain.scorer is plain.prior
    assert (bundle.describe()["scoring_prior"], plain.describe()["scoring_prior"]) == ("anomaly/prior/", "pixelcnn/")


def test_a_scoring_prior_of_another_vqvae_is_refused(checked_dir, tmp_path):
    import shutil

    folder = save_bundle(tmp_path / "other", *tiny_models(seed=5))
    shutil.copytree(checked_dir / "anomaly" / "prior", folder / "anomaly" / "prior")
    with pytest.raises(CheckpointError, match="anomaly/prior' was trained on VQ-VAE"):
        hub.load_bundle(folder)


def test_the_anomaly_files_travel_through_export_push_and_download(fake_hub, checked_dir, tmp_path, capsys):
    """A published bundle keeps its Anomaly tab and upload check: export copies anomaly/ (found beside --pixelcnn),
    push uploads it and load_from_hub fetches it, so the downloaded bundle is calibrated like the local one."""
    from brainvq import anomaly, demo, slicecheck
    from test_anomaly import slices

    assert hub.main(["export", "--out", str(tmp_path / "export"), "--vqvae", str(checked_dir / "vqvae"),
                     "--pixelcnn", str(checked_dir / "pixelcnn"), "--repo-id", "me/checked"]) == 0
    assert "VQ-VAE + PixelCNN + anomaly files" in capsys.readouterr().out
    out = tmp_path / "export"
    for name in hub.ANOMALY_FILES:
        assert (out / name).read_bytes() == (checked_dir / name).read_bytes()
    assert "- `anomaly/`: what the demo's Anomaly tab and upload check need" in (out / "README.md").read_text()
    hub.push_bundle(out, "me/checked", token="hf_fake_token")
    assert set(hub.ANOMALY_FILES) <= set(fake_hub.commits["me/checked"][fake_hub.refs["me/checked"]["main"]])

    bundle = hub.load_from_hub("me/checked", cache_dir=tmp_path / "cache")
    local = hub.load_bundle(checked_dir)
    image = slices(1, seed=5)
    ours, theirs = (anomaly.Detector.load(b.folder, b.vqvae, b.scorer).analyze(image)[0] for b in (bundle, local))
    assert np.array_equal(ours.map, theirs.map) and ours.percentile == theirs.percentile
    assert slicecheck.limits_for(bundle.folder, bundle.vqvae, bundle.scorer)[1] is None
    uploaded = (image[0] * 255).astype(np.uint8)
    assert demo.reconstruct(bundle, uploaded).check == demo.reconstruct(local, uploaded).check is not None


def test_export_refuses_anomaly_files_of_other_models_before_writing(checked_dir, tmp_path):
    from brainvq import anomaly, slicecheck

    bundle_dir = save_bundle(tmp_path / "other", *tiny_models(seed=5))
    with pytest.raises(CheckpointError, match="anomaly/local' was trained on VQ-VAE"):
        hub.export_bundle(tmp_path / "out", bundle_dir / "vqvae", bundle_dir / "pixelcnn", "me/x",
                          checked_dir / anomaly.ANOMALY_DIR)
    (tmp_path / "no-models").mkdir()
    for name, problem in ((anomaly.CALIBRATION_NAME, "anomaly calibration was measured on other models"),
                          (slicecheck.LIMITS_NAME, "upload check's limits were measured on other models")):
        alone = tmp_path / name
        alone.mkdir()
        (alone / name).write_bytes((checked_dir / anomaly.ANOMALY_DIR / name).read_bytes())
        with pytest.raises(HubError, match=f"{problem}.*bench/anomaly.py"):
            hub.export_bundle(tmp_path / "out", bundle_dir / "vqvae", bundle_dir / "pixelcnn", "me/x", alone)
    with pytest.raises(HubError, match="holds no anomaly files"):
        hub.export_bundle(tmp_path / "out", bundle_dir / "vqvae", bundle_dir / "pixelcnn", "me/x", tmp_path / "out")
    with pytest.raises(HubError, match="without a prior"):
        hub.export_bundle(tmp_path / "out", checked_dir / "vqvae", None, "me/x", checked_dir / "anomaly")
    assert not (tmp_path / "out").exists()
    hub.export_bundle(tmp_path / "out", checked_dir / "vqvae", checked_dir / "pixelcnn", "me/x", checked_dir / "anomaly")
    with pytest.raises(HubError, match="anomaly folder was given"):   # a re-export without it would mix stale files
        hub.export_bundle(tmp_path / "out", checked_dir / "vqvae", checked_dir / "pixelcnn", "me/x")

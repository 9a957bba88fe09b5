"""Model bundles: load the VQ-VAE + PixelCNN pair from the Hugging Face Hub or a local folder, export and push them.

A bundle is a folder with ``vqvae/`` and (optionally) ``pixelcnn/``, each holding ``model.safetensors`` and
``config.json``. The Hub repository holds the same layout plus a model card (``README.md``)::

    python -m brainvq.hub export --out hub_export            # checkpoints/ -> hub_export/ + model card
    python -m brainvq.hub push --folder hub_export --repo-id owner/name [--private]

Environment: ``HF_ENDPOINT`` (read at call time, default https://huggingface.co), ``BRAINVQ_HUB_REPO`` (the
default repository), ``BRAINVQ_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` (never touch the network),
``HF_HUB_CACHE`` / ``HF_HOME`` (download cache, read at call time), ``HF_TOKEN`` (private repos, pushing).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                   OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

from brainvq.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from brainvq.io import atomic_write_bytes
from brainvq.pixelcnn import GatedPixelCNN
from brainvq.vqvae import VQVAE

log = logging.getLogger(__name__)

_BUILTIN_REPO_ID = "brainvq/brainvq-alzheimer-t1"
DEFAULT_REPO_ID: str = os.environ.get("BRAINVQ_HUB_REPO", "").strip() or _BUILTIN_REPO_ID
REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DIR: Path = REPO_ROOT / "checkpoints"
DEFAULT_ENDPOINT = "https://huggingface.co"
VQVAE_FILES = (f"vqvae/{CONFIG_NAME}", f"vqvae/{WEIGHTS_NAME}")
PRIOR_FILES = (f"pixelcnn/{CONFIG_NAME}", f"pixelcnn/{WEIGHTS_NAME}")
BUNDLE_FILES = VQVAE_FILES + PRIOR_FILES
MAX_REPO_ID = 96
MAX_REVISION = 128
MAX_LOCAL_PATH = 4096

_REPO_PART = re.compile(r"[A-Za-z0-9._-]+")
_REVISION = re.compile(r"[A-Za-z0-9._+\-/]+")
_TRUE = {"1", "true", "yes", "on"}

__all__ = ["DEFAULT_REPO_ID", "BUNDLED_DIR", "HubError", "ModelBundle", "validate_repo_id", "validate_revision",
           "download_bundle", "load_bundle", "load_from_hub", "resolve_local", "load_local", "load_default",
           "export_bundle", "push_bundle", "main"]


class HubError(RuntimeError):
    """A Hub repository or local folder that cannot be used; the message is meant for the user."""


@dataclass
class ModelBundle:
    """A loaded VQ-VAE, its prior (None when the bundle has no pixelcnn/) and where they came from."""

    vqvae: VQVAE
    prior: GatedPixelCNN | None
    source: str
    notice: str | None = None
    folder: Path | None = None

    def describe(self) -> dict[str, Any]:
        """Summary for display: source, K, D, grid, parameter counts, metrics and training data from the configs."""
        vq_meta = getattr(self.vqvae, "meta", None) or {}
        prior_meta = (getattr(self.prior, "meta", None) or {}) if self.prior is not None else {}
        grid = self.vqvae.grid_size()
        return {
            "source": self.source,
            "notice": self.notice,
            "folder": str(self.folder) if self.folder is not None else None,
            "K": self.vqvae.cfg.num_codes,
            "D": self.vqvae.cfg.code_dim,
            "grid_size": grid,
            "grid": f"{grid}x{grid}",
            "vqvae_fingerprint": self.vqvae.fingerprint(),
            "vqvae_params": _vqvae_params(self.vqvae),
            "prior_params": _count_params(self.prior) if self.prior is not None else None,
            "has_prior": self.prior is not None,
            "metrics": {"vqvae": dict(vq_meta.get("metrics") or {}),
                        "pixelcnn": dict(prior_meta.get("metrics") or {}) if self.prior is not None else None},
            "data": dict(vq_meta.get("data") or prior_meta.get("data") or {}),
        }


def _count_params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _vqvae_params(model: VQVAE) -> int:
    """Trainable parameters plus the K x D codebook (an EMA-updated buffer, not a Parameter)."""
    return _count_params(model) + int(model.quantizer.codebook.numel())


# ---------------------------------------------------------------------------------------------- validation


def validate_repo_id(repo_id: str) -> str:
    """Return the stripped ``owner/name`` or raise HubError; only [A-Za-z0-9._-], no '..' or '--' (as the Hub)."""
    if not isinstance(repo_id, str):
        raise HubError(f"A Hub repository id must be text like 'owner/name', not {type(repo_id).__name__}.")
    value = repo_id.strip()
    shown = value if len(value) <= 120 else value[:117] + "..."
    problem = None
    if not value:
        problem = "it is empty"
    elif len(value) > MAX_REPO_ID:
        problem = f"it is longer than {MAX_REPO_ID} characters"
    elif value.count("/") != 1:
        problem = "it must have exactly one '/' between owner and name"
    else:
        for part in value.split("/"):
            if not _REPO_PART.fullmatch(part):
                problem = "owner and name may only use letters, digits, '.', '_' and '-'"
            elif ".." in part or "--" in part:
                problem = "it must not contain '..' or '--'"
            elif part[0] in "-." or part[-1] in "-.":
                problem = "owner and name must not start or end with '-' or '.'"
            if problem:
                break
    if problem:
        raise HubError(f"{shown!r} is not a valid Hugging Face repository id ({problem}); "
                       f"expected 'owner/name', e.g. {_BUILTIN_REPO_ID!r}.")
    return value


def validate_revision(revision: str | None) -> str:
    """Return a branch, tag or 40-hex commit (None or '' -> 'main'), or raise HubError."""
    if revision is None:
        return "main"
    if not isinstance(revision, str):
        raise HubError(f"A revision must be text (a branch, tag or commit), not {type(revision).__name__}.")
    value = revision.strip()
    if not value:
        return "main"
    shown = value if len(value) <= 60 else value[:57] + "..."
    problem = None
    if len(value) > MAX_REVISION:
        problem = f"it is longer than {MAX_REVISION} characters"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in value) or any(ch.isspace() for ch in value):
        problem = "it contains spaces or control characters"
    elif ".." in value:
        problem = "it must not contain '..'"
    elif value.startswith("/") or value.endswith("/") or "//" in value:
        problem = "it must not start or end with '/' or contain '//'"
    elif not _REVISION.fullmatch(value):
        problem = "only letters, digits and . _ + - / are allowed"
    elif value.endswith((".", ".lock")) or any(part.startswith(".") for part in value.split("/")):
        problem = "no part may start with '.' and it must not end with '.' or '.lock'"
    if problem:
        raise HubError(f"{shown!r} is not a valid revision ({problem}); use a branch or tag name such as 'main', "
                       "or a 40-character commit hash.")
    return value


# ---------------------------------------------------------------------------------------------- environment


def hub_endpoint() -> str:
    """The Hub URL: env HF_ENDPOINT read now (huggingface_hub reads it only at import), default huggingface.co."""
    return (os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT).rstrip("/")


def default_repo_id() -> str:
    """Env BRAINVQ_HUB_REPO read now, else the built-in repository."""
    return os.environ.get("BRAINVQ_HUB_REPO", "").strip() or _BUILTIN_REPO_ID


def offline_reason() -> str | None:
    """Which env variable asks to stay off the network, or None."""
    for name in ("BRAINVQ_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name}={os.environ[name].strip()}"
    return None


def _cache_root(cache_dir: str | Path | None) -> Path:
    """Download cache: the argument, else env HF_HUB_CACHE or HF_HOME/hub read now, else huggingface_hub's default."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def _connection_error_types() -> tuple[type[BaseException], ...]:
    """Transport-level failures of every HTTP client huggingface_hub has used (httpx2, httpx, requests)."""
    types: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        types += [getattr(mod, name) for name in names if isinstance(getattr(mod, name, None), type)]
    return tuple(types)


CONNECTION_ERRORS = _connection_error_types()


def _skip_agent_registry_fetch() -> None:
    """Stop huggingface_hub (2.x) from fetching its "agent harnesses" list on the first request of the process.

    That best-effort telemetry fetch goes to the endpoint captured at import time (not the HF_ENDPOINT we pass),
    can wait up to 3 s on an unreachable Hub, and only sets a User-Agent field; an empty list just leaves it out.
    """
    try:
        from huggingface_hub.utils import _detect_agent
    except ImportError:
        return
    if getattr(_detect_agent, "_registry", ...) is None and hasattr(_detect_agent, "_EMPTY_REGISTRY"):
        _detect_agent._registry = _detect_agent._EMPTY_REGISTRY


def _reason(error: BaseException) -> str:
    """A short one-line reason from an exception and its causes."""
    text = " ".join(str(error).split()) or type(error).__name__
    cause = error.__cause__ or error.__context__
    if cause is not None and isinstance(error, LocalEntryNotFoundError):
        text = " ".join(str(cause).split()) or type(cause).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _unreachable(endpoint: str, error: BaseException) -> HubError:
    if isinstance(error, OfflineModeIsEnabled):
        return HubError(f"cannot reach the Hugging Face Hub at {endpoint}: offline mode is on (HF_HUB_OFFLINE).")
    return HubError(f"cannot reach the Hugging Face Hub at {endpoint} ({_reason(error)}). Check the network "
                    "connection or HF_ENDPOINT, or set BRAINVQ_OFFLINE=1 to use local checkpoints only.")


def _not_a_hub(endpoint: str, why: str) -> HubError:
    return HubError(f"{endpoint} does not answer like a Hugging Face Hub ({why}); check HF_ENDPOINT.")


def _as_hub_error(error: BaseException, repo_id: str, revision: str, filename: str, endpoint: str) -> HubError:
    """Translate a huggingface_hub / transport exception into a HubError with a clear message."""
    where = f"{repo_id}@{revision}"
    if isinstance(error, GatedRepoError):
        return HubError(f"the model repository {repo_id!r} on {endpoint} is gated: accept its terms on the Hub and "
                        "set HF_TOKEN to a token of an account that has access.")
    if isinstance(error, RepositoryNotFoundError):
        return HubError(f"the model repository {repo_id!r} was not found on {endpoint} (check the spelling; a private "
                        "repository also needs HF_TOKEN).")
    if isinstance(error, RevisionNotFoundError):
        return HubError(f"the model repository {repo_id!r} has no revision {revision!r} (no such branch, tag or "
                        "commit).")
    if isinstance(error, LocalEntryNotFoundError):  # hf_hub_download: no connection (or no Hub) and nothing cached
        if type(error.__cause__).__name__ == "FileMetadataError":
            return _not_a_hub(endpoint, _reason(error.__cause__))
        return _unreachable(endpoint, error)
    if isinstance(error, EntryNotFoundError):
        return HubError(f"{where} has no file {filename!r}: a BrainVQ bundle needs {VQVAE_FILES[0]} and "
                        f"{VQVAE_FILES[1]} (pixelcnn/ is optional). Export one with `python -m brainvq.hub export`.")
    if isinstance(error, HfHubHTTPError):
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        if status in (401, 403):
            return HubError(f"the Hub at {endpoint} refused access to {where} (HTTP {status}); a private repository "
                            "needs HF_TOKEN with read access.")
        detail = getattr(error, "server_message", None) or str(error).splitlines()[0]
        return HubError(f"the Hub at {endpoint} answered HTTP {status} for {filename!r} of {where} "
                        f"({' '.join(str(detail).split())[:200]}).")
    if isinstance(error, CONNECTION_ERRORS):
        return _unreachable(endpoint, error)
    if type(error).__name__ == "FileMetadataError":
        return _not_a_hub(endpoint, _reason(error))
    if isinstance(error, OSError):
        return HubError(f"could not store {filename!r} of {where} in the download cache ({_reason(error)}).")
    return HubError(f"downloading {filename!r} of {where} from {endpoint} failed ({type(error).__name__}: "
                    f"{_reason(error)}).")


# ---------------------------------------------------------------------------------------------- download


def _from_cache(repo_id: str, revision: str, cache: Path) -> Path | None:
    """The cached snapshot of a complete bundle for ``revision`` (no network), or None."""
    hits: dict[str, Any] = {}
    for name in BUNDLE_FILES:
        try:
            hits[name] = try_to_load_from_cache(repo_id, name, cache_dir=str(cache), revision=revision)
        except (OSError, ValueError):
            hits[name] = None
    if not all(isinstance(hits[name], str) for name in VQVAE_FILES):
        return None
    snapshot = Path(hits[VQVAE_FILES[0]]).parents[1]
    prior = [hits[name] for name in PRIOR_FILES]
    if all(isinstance(hit, str) for hit in prior):
        return snapshot
    if prior[0] is not None and not isinstance(prior[0], str):  # cached as "does not exist on the Hub"
        return snapshot
    return None  # the prior's files were never (fully) downloaded


def _download(repo_id: str, revision: str, cache_dir: str | Path | None, timeout: float) -> tuple[Path, str | None]:
    """Download (or reuse from the cache) a bundle; returns the snapshot folder and an optional notice."""
    repo_id, revision = validate_repo_id(repo_id), validate_revision(revision)
    endpoint, cache = hub_endpoint(), _cache_root(cache_dir)
    offline = offline_reason()
    if offline:
        cached = _from_cache(repo_id, revision, cache)
        if cached is None:
            raise HubError(f"offline mode ({offline}) is on and {repo_id}@{revision} is not in the download cache "
                           f"{cache}.")
        return cached, f"Offline mode ({offline}): using the cached copy of {repo_id}@{revision}."

    _skip_agent_registry_fetch()
    # One HEAD without retries first: huggingface_hub retries unreachable hosts with back-off for minutes, and
    # this also tells a missing repository, revision or file apart before anything is written to the cache.
    url = hf_hub_url(repo_id, VQVAE_FILES[0], revision=revision, endpoint=endpoint)
    try:
        metadata = get_hf_file_metadata(url, timeout=timeout, endpoint=endpoint)
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes a HubError with a message
        status = getattr(getattr(error, "response", None), "status_code", None)
        down = isinstance(error, CONNECTION_ERRORS) or (
            isinstance(error, HfHubHTTPError) and (status in (408, 429) or (status or 0) >= 500))
        cached = _from_cache(repo_id, revision, cache) if down else None
        if cached is None:
            raise _as_hub_error(error, repo_id, revision, VQVAE_FILES[0], endpoint) from error
        why = _reason(error) if status is None else f"HTTP {status}"
        log.warning("Hub unavailable (%s); using the cached snapshot %s", why, cached)
        return cached, (f"The Hugging Face Hub at {endpoint} is unreachable ({why}); using the cached copy "
                        f"of {repo_id}@{revision}.")
    if not getattr(metadata, "commit_hash", None) or not getattr(metadata, "etag", None):
        raise _not_a_hub(endpoint, "its answer lacks the X-Repo-Commit or ETag header of a Hub")

    def fetch(filename: str, rev: str, optional: bool = False) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=rev, cache_dir=str(cache), endpoint=endpoint,
                                        etag_timeout=timeout))
        except Exception as error:  # noqa: BLE001
            missing = isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError)
            if optional and missing:
                return None
            raise _as_hub_error(error, repo_id, revision, filename, endpoint) from error

    # The first file resolves the revision (and records it in the cache's refs/); the rest are pinned to that
    # commit, so a push between two downloads cannot mix files of two commits.
    snapshot = fetch(VQVAE_FILES[0], revision).parents[1]
    commit = snapshot.name
    fetch(VQVAE_FILES[1], commit)
    if fetch(PRIOR_FILES[0], commit, optional=True) is not None:  # no pixelcnn/: reconstruction only
        fetch(PRIOR_FILES[1], commit)
    return snapshot, None


def download_bundle(repo_id: str, revision: str = "main", cache_dir: str | Path | None = None,
                    timeout: float = 10.0) -> Path:
    """Download a bundle's files with hf_hub_download (HF_ENDPOINT read now) and return the snapshot folder."""
    return _download(repo_id, revision, cache_dir, timeout)[0]


# ---------------------------------------------------------------------------------------------- loading


def load_bundle(folder: str | Path, source: str | None = None) -> ModelBundle:
    """Load folder/vqvae and, if present, folder/pixelcnn (refused unless trained on that VQ-VAE)."""
    folder = Path(folder)
    vqvae = VQVAE.load(folder / "vqvae")
    prior_dir = folder / "pixelcnn"
    prior = GatedPixelCNN.load(prior_dir, vqvae=vqvae) if prior_dir.exists() else None
    return ModelBundle(vqvae=vqvae, prior=prior, source=source or f"local folder: {folder}", folder=folder)


def load_from_hub(repo_id: str, revision: str = "main", cache_dir: str | Path | None = None,
                  timeout: float = 10.0) -> ModelBundle:
    """Validate, download and load a Hub bundle; a corrupt download raises CheckpointError naming the file."""
    repo_id, revision = validate_repo_id(repo_id), validate_revision(revision)
    snapshot, notice = _download(repo_id, revision, cache_dir, timeout)
    commit = snapshot.name
    source = f"Hub: {repo_id}@{revision}" + (f" (commit {commit[:7]})" if commit != revision else "")
    try:
        bundle = load_bundle(snapshot, source=source)
    except CheckpointError as error:
        raise CheckpointError(f"{error} [downloaded from the Hugging Face Hub: {repo_id}@{revision}, commit "
                              f"{commit}; the repository's files are damaged, or delete {snapshot} to "
                              "download them again]") from error
    bundle.notice = notice
    return bundle


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_local(folder: str | Path, allowed_roots: list[Path]) -> Path:
    """Resolve ``folder`` (relative paths from the project root, symlinks followed) inside an allowed root, or raise.

    The refusal reads the same whether or not the path exists, so it cannot be used to probe the file system.
    """
    roots = [(p if p.is_absolute() else REPO_ROOT / p).resolve(strict=False) for p in map(Path, allowed_roots)]
    allowed = ", ".join(_display(root) for root in roots) or "none"
    raw = str(folder).strip() if isinstance(folder, (str, os.PathLike)) else ""
    shown = raw if len(raw) <= 120 else raw[:117] + "..."
    refusal = HubError(f"{shown!r} is not inside an allowed checkpoint folder (allowed: {allowed}). "
                       "Choose a folder under one of them.")
    if not raw or len(raw) > MAX_LOCAL_PATH or "\x00" in raw:
        raise refusal
    try:
        path = Path(raw)
        resolved = (path if path.is_absolute() else REPO_ROOT / path).resolve(strict=False)
    except (OSError, ValueError, RuntimeError):  # symlink loops, odd names
        raise refusal from None
    if not any(_inside(resolved, root) for root in roots):
        raise refusal
    return resolved


def _display(path: Path) -> str:
    """A path relative to the project root when inside it (what a Space visitor knows), else absolute."""
    try:
        return str(path.relative_to(REPO_ROOT)) + "/"
    except ValueError:
        return str(path)


def load_local(folder: str | Path, allowed_roots: list[Path]) -> ModelBundle:
    """resolve_local + load_bundle."""
    resolved = resolve_local(folder, allowed_roots)
    return load_bundle(resolved, source=f"local folder: {_display(resolved)}")


def load_default(repo_id: str | None = None, revision: str = "main", fallback: Path = BUNDLED_DIR) -> ModelBundle:
    """The Hub bundle, or the bundled weights with a notice when the Hub fails or offline mode is on."""
    repo = (repo_id or "").strip() or default_repo_id()
    rev = (revision or "").strip() or "main"
    fallback = Path(fallback)
    what = "checkpoints/" if fallback.resolve() == BUNDLED_DIR.resolve() else str(fallback)
    offline = offline_reason()
    if offline:
        notice = f"Offline mode ({offline}): skipped the Hugging Face Hub; using the bundled {what} weights."
        reason = "offline mode"
    else:
        try:
            return load_from_hub(repo, rev)
        except (HubError, CheckpointError) as error:
            reason = " ".join(str(error).split())
            notice = (f"Could not load {repo}@{rev} from the Hugging Face Hub, so the demo uses the bundled {what} "
                      "weights. Start it with `python app.py --offline` to skip the Hub.")
            log.warning("%s Reason: %s", notice, reason)
    try:
        bundle = load_bundle(fallback, source=f"local folder: {_display(fallback.resolve())}")
    except CheckpointError as error:
        raise CheckpointError(f"No model could be loaded: the Hub bundle {repo}@{rev} failed ({reason}), and the "
                              f"bundled weights failed too: {error}") from error
    bundle.notice = notice
    return bundle


# ---------------------------------------------------------------------------------------------- export / push


def _copy_atomic(src: Path, dst: Path) -> None:
    with open(src, "rb") as source:
        atomic_write_bytes(dst, lambda out: shutil.copyfileobj(source, out, 1 << 20))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


_METRIC_LABELS = {
    "val_ssim": "validation SSIM (higher is better)",
    "val_psnr": "validation PSNR, dB",
    "val_bits_per_code": "validation NLL, bits per code (lower is better)",
    "val_accuracy": "validation next-code accuracy",
    "unigram_bits_per_code": "unigram baseline, bits per code",
    "epoch": "epoch of this checkpoint",
}


def _metric_rows(model: str, metrics: dict[str, Any], prefix: str = "") -> list[str]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _metric_rows(model, value, f"{name}.")
        else:
            rows.append(f"| {model} | `{name}` | {_fmt(value)} | {_METRIC_LABELS.get(key, '')} |")
    return rows


def _data_statement(data: dict[str, Any]) -> str:
    """An honest description of the training data recorded in the config's "data" entry."""
    if not data:
        return "The checkpoint configs do not record the training data."
    layout = data.get("layout")
    root_name = Path(str(data.get("root", ""))).name
    seed = data.get("split_seed", "?")
    n_train, n_val = data.get("n_train"), data.get("n_val")
    counts = (f" ({n_train:,} training and {n_val:,} validation slices)"
              if isinstance(n_train, int) and isinstance(n_val, int) else "")
    if layout == "folder" and "alzheimer" in root_name.lower():
        return ("The shipped weights were trained on the Kaggle **\"Alzheimer's Dataset (4 class of Images)\"**: "
                "6,400 skull-stripped axial T1-weighted brain MRI slices of 176x208 pixels (5,121 train / 1,279 test "
                "JPEGs in four dementia classes), most likely derived from OASIS-1. The class labels were not used "
                "(the models are unconditional). Every slice was padded to 256x256; the test folder was held out "
                f"and the training folder was split **by file** with seed {seed}{counts}. The set has no subject "
                "ids, so slices of one subject can fall on both sides of that split and the validation figures "
                "may be optimistic. The weights were **not** trained on the OASIS `keras_png_slices_data` set.")
    if layout == "oasis":
        return ("The weights were trained on the preprocessed OASIS-1 brain slices (`keras_png_slices_data`, "
                f"256x256 PNGs); train and validate were merged and split **by case** with seed {seed}{counts}, "
                "and the test folder was held out.")
    return (f"The weights were trained on an image folder named `{root_name or '?'}` (layout `{layout}`), split "
            f"with seed {seed}{counts}.")


def model_card(vq_config: dict[str, Any], prior_config: dict[str, Any] | None, repo_id: str) -> str:
    """The Hub README.md: YAML front matter, metrics, training data and usage."""
    arch = vq_config.get("arch", {})
    k, d = arch.get("num_codes", "?"), arch.get("code_dim", "?")
    factor = 2 ** len(arch.get("widths", ())) if arch.get("widths") else None
    grid = f"{256 // factor}x{256 // factor}" if factor else "?"
    rows = _metric_rows("VQ-VAE", vq_config.get("metrics") or {})
    if prior_config is not None:
        rows += _metric_rows("PixelCNN", prior_config.get("metrics") or {})
    metrics = ("| model | metric | value | meaning |\n|---|---|---|---|\n" + "\n".join(rows)) if rows else \
        "The checkpoint configs record no metrics."
    prior_line = ("- `pixelcnn/`: a gated PixelCNN prior over the code grid, trained on this VQ-VAE's codes "
                  f"(VQ-VAE fingerprint `{prior_config.get('vqvae_fingerprint', '?')}`)."
                  if prior_config is not None else
                  "- No PixelCNN prior is included: reconstruction works, sampling new slices does not.")
    data = vq_config.get("data") or (prior_config or {}).get("data") or {}
    return f"""---
library_name: pytorch
license: mit
tags:
- brainvq
- vq-vae
- pixelcnn
- mri
---

# BrainVQ: VQ-VAE + PixelCNN prior for brain MRI slices

BrainVQ is for research and teaching, not for diagnosis or any clinical use.

- `vqvae/`: a VQ-VAE with an EMA codebook of K={k} codes of dimension D={d}; a 256x256 slice becomes a {grid}
  grid of code indices (fingerprint `{vq_config.get('fingerprint', '?')}`).
{prior_line}

Each folder holds `model.safetensors` (weights, no pickle) and `config.json` (architecture, training settings,
metrics).

## Metrics

{metrics}

The figures come from the checkpoints' own `config.json` ("metrics"), measured on the validation split
described below while training.

## Training data

{_data_statement(data)}

## Usage

```python
from brainvq import hub

bundle = hub.load_from_hub("{repo_id}")   # or hub.load_default(), which falls back to local weights
print(bundle.describe())
codes = bundle.vqvae.encode(images)        # (B,1,256,256) in [0,1] -> (B,{grid.replace('x', ',')}) codes
recon = bundle.vqvae.decode(codes)
```

The BrainVQ Gradio demo loads this repository by default (set `BRAINVQ_HUB_REPO` to choose another, or start
it with `python app.py --offline` to use the bundled `checkpoints/` folder).

## Limitations

Research and teaching code. The models were trained on a small, preprocessed public set of 2D slices and are
not meant for diagnosis or any clinical use.
"""


def export_bundle(out: Path, vqvae_dir: Path, prior_dir: Path | None, repo_id: str) -> Path:
    """Copy the checkpoints into out/vqvae and out/pixelcnn (atomically) and write a model card out/README.md."""
    repo_id = validate_repo_id(repo_id)
    out, vqvae_dir = Path(out), Path(vqvae_dir)
    prior_dir = Path(prior_dir) if prior_dir is not None else None
    vqvae = VQVAE.load(vqvae_dir)  # refuse to export anything that would not load, or a mismatched pair
    prior = GatedPixelCNN.load(prior_dir, vqvae=vqvae) if prior_dir is not None else None
    if prior_dir is None and (out / "pixelcnn").exists():
        raise HubError(f"{out / 'pixelcnn'} already exists but no prior was given: remove it or pass the prior, so "
                       "the export does not mix a stale prior with this VQ-VAE.")
    for sub, src in (("vqvae", vqvae_dir), ("pixelcnn", prior_dir)):
        if src is None:
            continue
        if (out / sub).resolve() == src.resolve():
            continue  # exporting in place: the files are already there
        for name in (WEIGHTS_NAME, CONFIG_NAME):  # config last: a folder with a config is complete
            _copy_atomic(src / name, out / sub / name)
    card = model_card(vqvae.meta, prior.meta if prior is not None else None, repo_id).encode()
    atomic_write_bytes(out / "README.md", lambda file: file.write(card))
    return out


def push_bundle(folder: Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the Hub repository if needed and upload the bundle folder; returns the commit URL."""
    repo_id = validate_repo_id(repo_id)
    folder = Path(folder)
    load_bundle(folder)  # never publish a bundle that does not load
    files = [name for name in ("README.md",) + BUNDLE_FILES if (folder / name).is_file()]
    endpoint = hub_endpoint()
    _skip_agent_registry_fetch()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 allow_patterns=files, commit_message="Upload BrainVQ checkpoints")
    except Exception as error:  # noqa: BLE001
        raise _push_error(error, repo_id, endpoint) from error
    return str(getattr(info, "commit_url", info))


def _push_error(error: BaseException, repo_id: str, endpoint: str) -> HubError:
    """Translate a failed create_repo / upload_folder into a HubError."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        return HubError(f"the Hub at {endpoint} refused to create or write {repo_id!r} (HTTP {status}): pass a token "
                        "with write access (--token or HF_TOKEN).")
    if isinstance(error, HfHubHTTPError):
        detail = getattr(error, "server_message", None) or str(error).splitlines()[0]
        return HubError(f"the Hub at {endpoint} refused the upload to {repo_id!r} (HTTP {status}: "
                        f"{' '.join(str(detail).split())[:300]}).")
    if isinstance(error, CONNECTION_ERRORS):
        return _unreachable(endpoint, error)
    return HubError(f"uploading to {repo_id!r} on {endpoint} failed ({type(error).__name__}: {_reason(error)}).")


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: Iterable[str] | None = None) -> int:
    """CLI: ``export`` a bundle with a model card, or ``push`` one to the Hub."""
    parser = argparse.ArgumentParser(prog="python -m brainvq.hub", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="copy checkpoints into a Hub-ready folder with a model card")
    export.add_argument("--out", required=True, type=Path, help="folder to write")
    export.add_argument("--vqvae", type=Path, default=BUNDLED_DIR / "vqvae", help="VQ-VAE checkpoint folder")
    export.add_argument("--pixelcnn", type=Path, default=None,
                        help="PixelCNN checkpoint folder (default: checkpoints/pixelcnn if it exists)")
    export.add_argument("--no-pixelcnn", action="store_true", help="export the VQ-VAE alone")
    export.add_argument("--repo-id", default=default_repo_id(), help="repository named in the model card")
    push = sub.add_parser("push", help="upload an exported folder to the Hub (HF_TOKEN or --token)")
    push.add_argument("--folder", required=True, type=Path)
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN / login)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "export":
            prior = None if args.no_pixelcnn else args.pixelcnn
            if prior is None and not args.no_pixelcnn and (BUNDLED_DIR / "pixelcnn").exists():
                prior = BUNDLED_DIR / "pixelcnn"
            out = export_bundle(args.out, args.vqvae, prior, args.repo_id)
            what = "VQ-VAE + PixelCNN" if prior else "VQ-VAE only"
            print(f"exported {what} to {out} (model card: {out / 'README.md'})")
        else:
            print(push_bundle(args.folder, args.repo_id, token=args.token, private=args.private))
    except (HubError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model bundles: the VQ-VAE + PixelCNN pair from the Hugging Face Hub or a local folder; export and push them.

A bundle is a folder or Hub repository with ``vqvae/`` and optionally ``pixelcnn/`` (each from ``save_pretrained``),
optionally ``anomaly/`` (the local-context prior, a scoring prior, the anomaly calibration and the upload check's
limits, which hold only for the exact models they were measured on) and a model card. Offline mode is the
library's: ``HF_HUB_OFFLINE=1``, or ``local_files_only`` (``app.py --offline``).
``HF_ENDPOINT`` and ``HF_HUB_CACHE`` are read at call time; ``BRAINVQ_HUB_REPO`` names the default repository.

    python -m brainvq.hub export --out hub_export            # checkpoints/ -> hub_export/ + model card
    python -m brainvq.hub push --folder hub_export --repo-id owner/name [--private]
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (FileMetadataError, GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                    OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id

from brainvq import anomaly, slicecheck
from brainvq.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from brainvq.io import atomic_write_bytes
from brainvq.pixelcnn import GatedPixelCNN
from brainvq.vqvae import VQVAE

log = logging.getLogger(__name__)

DEFAULT_REPO_ID = "brainvq/brainvq-alzheimer-t1"
REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DIR = REPO_ROOT / "checkpoints"
VQVAE_FILES = (f"vqvae/{CONFIG_NAME}", f"vqvae/{WEIGHTS_NAME}")
PRIOR_FILES = (f"pixelcnn/{CONFIG_NAME}", f"pixelcnn/{WEIGHTS_NAME}")
ANOMALY_MODELS = ("local", anomaly.SCORING_DIR)  # anomaly/local: the local-context prior; anomaly/prior: scoring_prior
MODEL_FILES = {name: (f"{anomaly.ANOMALY_DIR}/{name}/{CONFIG_NAME}", f"{anomaly.ANOMALY_DIR}/{name}/{WEIGHTS_NAME}")
               for name in ANOMALY_MODELS}
ANOMALY_FILES = (f"{anomaly.ANOMALY_DIR}/{anomaly.CALIBRATION_NAME}", f"{anomaly.ANOMALY_DIR}/{slicecheck.LIMITS_NAME}",
                 *(f for files in MODEL_FILES.values() for f in files))  # optional: the Anomaly tab and upload check
_REVISION = re.compile(r"[A-Za-z0-9._+\-/]{1,128}")  # the characters git allows in a ref name, less the rare ones

# Every Hub failure the user can meet, in one place ("offline", "unreachable", "down": no complete cached copy either).
MESSAGES = {
    "offline": "offline mode is on and {where} is not (completely) in the download cache.",
    "unreachable": "cannot reach the Hugging Face Hub at {endpoint}; check the network connection or HF_ENDPOINT.",
    "down": "the Hugging Face Hub at {endpoint} answered HTTP {status} for {where}; try again later.",
    "not_a_hub": "{endpoint} does not answer like a Hugging Face Hub; check HF_ENDPOINT.",
    "no_repo": "the model repository {repo!r} was not found on {endpoint}; check its spelling, or set HF_TOKEN.",
    "gated": "the model repository {repo!r} is gated: accept its terms on the Hub, then set HF_TOKEN.",
    "no_revision": "the model repository {repo!r} has no revision {revision!r} (no such branch, tag or commit).",
    "no_file": "{where} has no file {file!r}: a bundle needs vqvae/ (config.json, model.safetensors); pixelcnn/ is "
               "optional. Export one with `python -m brainvq.hub export`.",
    "denied": "the Hub at {endpoint} refused access to {where} (HTTP {status}); set HF_TOKEN (or --token) with access.",
    "http": "the Hub at {endpoint} answered HTTP {status} for {where} ({detail}).",
    "cache": "could not write {where} to the download cache ({detail}).",
}
_ERROR_KINDS = ((GatedRepoError, "gated"), (RepositoryNotFoundError, "no_repo"), (RevisionNotFoundError, "no_revision"),
                ((OfflineModeIsEnabled, LocalEntryNotFoundError), "offline"), (FileMetadataError, "not_a_hub"))


class HubError(RuntimeError):
    """A Hub repository or local folder that cannot be used; the message is meant for the user."""

    kind = "invalid"  # bad input; hub_error() sets a key of MESSAGES


def _endpoint() -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at import), else the library's endpoint."""
    return (os.environ.get("HF_ENDPOINT", "").strip() or constants.ENDPOINT).rstrip("/")


def hub_error(kind: str, repo: str = "", revision: str = "main", **fields: Any) -> HubError:
    """The HubError of MESSAGES[kind], filled in; ``endpoint`` defaults to HF_ENDPOINT read now."""
    fields = {"status": None, **fields, "endpoint": fields.get("endpoint") or _endpoint()}
    error = HubError(MESSAGES[kind].format(repo=repo, revision=revision, where=f"{repo}@{revision}", **fields))
    error.kind = kind
    return error


def explain(error: BaseException, repo: str, revision: str = "main", endpoint: str | None = None) -> HubError:
    """The HubError for a failed huggingface_hub call; the original goes to the log."""
    if isinstance(error, HubError):
        return error
    if isinstance(error, LocalEntryNotFoundError) and error.__cause__ is not None:  # the Hub failed, no cached copy
        return explain(error.__cause__, repo, revision, endpoint)  # (no cause: local_files_only, no cached copy)
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    detail = " ".join(str(getattr(error, "server_message", None) or error).split())[:200]
    kind = next((kind for error_class, kind in _ERROR_KINDS if isinstance(error, error_class)), None)
    if kind is None and status:
        kind = ("denied" if status in (401, 403) else "down" if status in (408, 429) or status >= 500
                else "not_a_hub" if status == 404 and "X-Error-Code" not in response.headers  # the Hub names its 404s
                else "http")
    elif kind is None:  # no answer, an answer that is not the Hub's JSON, a full disk, or a transport error
        kind = ("not_a_hub" if isinstance(error, (ValueError, KeyError, TypeError))
                else "cache" if isinstance(error, OSError) else "unreachable")
    log.log(logging.INFO if kind == "offline" else logging.WARNING, "Hub: %s@%s: %r", repo, revision, error)
    return hub_error(kind, repo, revision, status=status, endpoint=endpoint, detail=detail)


def default_repo_id() -> str:
    """Env BRAINVQ_HUB_REPO read now, else the built-in repository."""
    return os.environ.get("BRAINVQ_HUB_REPO", "").strip() or DEFAULT_REPO_ID


def validate_repo_id(repo_id: str) -> str:
    """The stripped id, if huggingface_hub's validator accepts it; else a HubError saying what a valid one is."""
    value = repo_id.strip() if isinstance(repo_id, str) else repo_id
    try:
        hf_validate_repo_id(value or "")
    except HFValidationError:
        raise HubError(f"{str(value)[:60]!r} is not a valid Hugging Face repository id: use 'owner/name' with letters, "
                       "digits, '-', '_' or '.' (no '--' or '..', at most 96 characters).") from None
    return value


def validate_revision(revision: str | None) -> str:
    """A branch, tag or commit (None or '' -> 'main') by git's ref-name rules; huggingface_hub has no validator."""
    value = (revision or "").strip() or "main"
    if not _REVISION.fullmatch(value) or ".." in value or any(
            not part or part.startswith(".") or part.endswith((".", ".lock")) for part in value.split("/")):
        raise HubError(f"{value[:60]!r} is not a valid revision: use a branch or tag name such as 'main', or a "
                       "40-character commit hash.")
    return value


@dataclass(eq=False)
class ModelBundle:
    """A loaded VQ-VAE, its prior (None when the bundle has no pixelcnn/) and where they came from; compared by
    identity, so what is made once per loaded bundle (``brainvq.demo.WeakMemo``) can be keyed by it."""

    vqvae: VQVAE
    prior: GatedPixelCNN | None
    source: str
    notice: str | None = None
    folder: Path | None = None
    scoring_prior: GatedPixelCNN | None = None  # anomaly/prior, when the bundle has one

    @property
    def scorer(self) -> GatedPixelCNN | None:
        """The prior that judges slices (anomaly maps, upload check): anomaly/prior if loaded, else the prior."""
        return self.scoring_prior if self.scoring_prior is not None else self.prior

    def describe(self) -> dict[str, Any]:
        """Summary for display: source, K, D, grid, parameter counts, metrics and training data from the configs."""
        vq_meta, prior_meta = self.vqvae.meta, self.prior.meta if self.prior is not None else {}
        grid = self.vqvae.grid_size()
        return {
            "source": self.source, "notice": self.notice, "folder": str(self.folder) if self.folder else None,
            "K": self.vqvae.cfg.num_codes, "D": self.vqvae.cfg.code_dim, "grid_size": grid, "grid": f"{grid}x{grid}",
            "vqvae_fingerprint": self.vqvae.fingerprint(),
            # the K x D codebook is an EMA-updated buffer, not a Parameter, but it is learned all the same
            "vqvae_params": sum(p.numel() for p in self.vqvae.parameters()) + self.vqvae.quantizer.codebook.numel(),
            "prior_params": sum(p.numel() for p in self.prior.parameters()) if self.prior is not None else None,
            "has_prior": self.prior is not None,
            "scoring_prior": ("anomaly/prior/" if self.scoring_prior is not None else
                              "pixelcnn/" if self.prior is not None else None),
            "metrics": {"vqvae": dict(vq_meta.get("metrics") or {}),
                        "pixelcnn": dict(prior_meta.get("metrics") or {}) if self.prior is not None else None},
            "data": dict(vq_meta.get("data") or prior_meta.get("data") or {}),
        }


def load_bundle(folder: str | Path, source: str | None = None) -> ModelBundle:
    """Load folder/vqvae and, if present, folder/pixelcnn and folder/anomaly/prior (each refused unless trained on
    that VQ-VAE)."""
    folder = Path(folder)
    vqvae = VQVAE.from_pretrained(folder / "vqvae")
    prior = GatedPixelCNN.from_pretrained(folder / "pixelcnn", vqvae=vqvae) if (folder / "pixelcnn").exists() else None
    scorer = anomaly.scoring_prior(folder, vqvae, prior) if prior is not None else None
    return ModelBundle(vqvae, prior, source or f"local folder: {_display(folder.resolve())}", folder=folder,
                       scoring_prior=scorer if scorer is not prior else None)


def load_from_hub(repo_id: str, revision: str = "main", cache_dir: str | Path | None = None,
                  local_files_only: bool = False) -> ModelBundle:
    """snapshot_download and load a Hub bundle (offline or with the Hub unreachable: a complete cached copy). A damaged
    download is a CheckpointError naming the file; every other failure a HubError from MESSAGES."""
    repo_id, revision = validate_repo_id(repo_id), validate_revision(revision)
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision,
                                          allow_patterns=[*VQVAE_FILES, *PRIOR_FILES, *ANOMALY_FILES],
                                          endpoint=_endpoint(), cache_dir=cache_dir or os.environ.get("HF_HUB_CACHE"),
                                          local_files_only=local_files_only))
    except Exception as error:  # noqa: BLE001 - explain() sorts every failure
        raise explain(error, repo_id, revision) from error
    models = [f for files in MODEL_FILES.values() if (snapshot / files[0]).parent.exists() for f in files]
    for name in VQVAE_FILES + (PRIOR_FILES if (snapshot / "pixelcnn").exists() else ()) + tuple(models):
        if not (snapshot / name).is_file():
            raise hub_error("no_file", repo_id, revision, file=name)
    commit = snapshot.name
    source = f"Hub: {repo_id}@{revision}" + (f" (commit {commit[:7]})" if commit != revision else "")
    try:
        bundle = load_bundle(snapshot, source=source)
    except CheckpointError as error:
        raise CheckpointError(f"{error} [downloaded from the Hugging Face Hub: {repo_id}@{revision}, commit {commit}; "
                              f"the repository's files are damaged, or delete {snapshot} to download them again]"
                              ) from error
    return bundle


def resolve_local(folder: str | Path, allowed_roots: list[Path]) -> Path:
    """Resolve ``folder`` (relative to the project root, symlinks followed) inside an allowed root, or raise a refusal
    that reads the same whether or not the path exists, so it cannot be used to probe the file system."""
    roots = [(p if p.is_absolute() else REPO_ROOT / p).resolve(strict=False) for p in map(Path, allowed_roots)]
    raw = str(folder).strip() if isinstance(folder, (str, os.PathLike)) else ""
    refusal = HubError(f"{raw[:120]!r} is not inside an allowed checkpoint folder (allowed: "
                       f"{', '.join(map(_display, roots)) or 'none'}). Choose a folder under one of them.")
    try:
        resolved = (REPO_ROOT / raw).resolve(strict=False)  # an absolute raw replaces REPO_ROOT
    except (OSError, ValueError, RuntimeError):  # symlink loops, NUL bytes, odd names
        raise refusal from None
    if not raw or not any(resolved == root or root in resolved.parents for root in roots):
        raise refusal
    return resolved


def _display(path: Path) -> str:
    """A path relative to the project root when inside it (what a Space visitor knows), else absolute."""
    return f"{path.relative_to(REPO_ROOT)}/" if path.is_relative_to(REPO_ROOT) else str(path)


def load_local(folder: str | Path, allowed_roots: list[Path]) -> ModelBundle:
    """resolve_local + load_bundle."""
    return load_bundle(resolve_local(folder, allowed_roots))


def load_default(repo_id: str | None = None, revision: str = "main", fallback: Path = BUNDLED_DIR,
                 offline: bool = False) -> ModelBundle:
    """The Hub bundle (from the cache only when ``offline``), else the ``fallback`` weights with a notice saying why."""
    repo, rev = (repo_id or "").strip() or default_repo_id(), (revision or "").strip() or "main"
    what = _display(Path(fallback).resolve())
    try:
        return load_from_hub(repo, rev, local_files_only=offline)
    except (HubError, CheckpointError) as error:
        reason, kind = " ".join(str(error).split()), getattr(error, "kind", None)
    if kind == "offline":
        notice = f"Offline mode: {repo}@{rev} is not in the download cache, so the bundled {what} weights are in use."
    elif kind in ("unreachable", "down"):
        notice = (f"The Hugging Face Hub at {_endpoint()} is unreachable, so the bundled {what} weights are in use. "
                  "Start the app with --offline to skip the Hub.")
    else:
        notice = f"Could not load {repo}@{rev} from the Hugging Face Hub ({reason}); using the bundled {what} weights."
    log.warning(notice)
    try:
        bundle = load_bundle(fallback)
    except CheckpointError as error:
        raise CheckpointError(f"No model could be loaded: the Hub bundle {repo}@{rev} failed ({reason}), and the "
                              f"bundled weights failed too: {error}") from error
    bundle.notice = notice
    return bundle


def export_bundle(out: Path, vqvae_dir: Path, prior_dir: Path | None, repo_id: str,
                  anomaly_dir: Path | None = None) -> Path:
    """Save both checkpoints to out/vqvae and out/pixelcnn (save_pretrained), what ``anomaly_dir`` holds to
    out/anomaly (checked by anomaly_parts) and the bundle's card to out/README.md."""
    repo_id, out = validate_repo_id(repo_id), Path(out)
    vqvae = VQVAE.from_pretrained(Path(vqvae_dir))  # refuse to export anything that would not load, or a mismatch
    prior = GatedPixelCNN.from_pretrained(Path(prior_dir), vqvae=vqvae) if prior_dir is not None else None
    for part, given in (("pixelcnn", prior), (anomaly.ANOMALY_DIR, anomaly_dir)):
        if given is None and (out / part).exists():
            raise HubError(f"{out / part} already exists but no {'prior' if part == 'pixelcnn' else 'anomaly folder'} "
                           "was given: remove it or pass one, so the export does not mix stale files with these "
                           "models.")
    if anomaly_dir is not None and prior is None:
        raise HubError("An anomaly folder was given without a prior: anomaly maps and the upload check need the prior.")
    parts = anomaly_parts(Path(anomaly_dir), vqvae, prior) if anomaly_dir is not None else {}
    vqvae.save_pretrained(out / "vqvae")
    if prior is not None:
        prior.save_pretrained(out / "pixelcnn")
    for name, part in parts.items():
        target = out / anomaly.ANOMALY_DIR / name
        part.save_pretrained(target) if name in ANOMALY_MODELS else part.save(target)
    card = vqvae.generate_model_card(pixelcnn=prior.checkpoint_config() if prior is not None else None, bundle=True,
                                     repo_id=repo_id,
                                     anomaly=[f"{name}/" if name in ANOMALY_MODELS else name for name in sorted(parts)])
    atomic_write_bytes(out / "README.md", lambda file: file.write(str(card).encode()))
    return out


def anomaly_parts(folder: Path, vqvae: VQVAE, prior: GatedPixelCNN) -> dict[str, Any]:
    """What an anomaly folder holds, read and checked against the models before anything is written: the local
    prior ("local"), the scoring prior ("prior"), the anomaly calibration and the upload check's limits (by their
    file names). A part measured on other models is refused, since the demo would ignore it."""
    rerun = ("Re-run `python bench/anomaly.py --checkpoints DIR` and `python bench/slice_check.py --checkpoints DIR` "
             "on the exported models, or export without it (--no-anomaly).")
    parts: dict[str, Any] = {}
    for name in ANOMALY_MODELS:
        if (folder / name).is_dir():
            parts[name] = GatedPixelCNN.from_pretrained(folder / name, vqvae=vqvae)
    prior = parts.get(anomaly.SCORING_DIR, prior)   # what the calibration and the limits were measured with
    if (folder / anomaly.CALIBRATION_NAME).is_file():
        try:
            calibration = anomaly.Calibration.load(folder / anomaly.CALIBRATION_NAME)
        except anomaly.AnomalyError as error:
            raise HubError(f"{error} {rerun}") from None
        detector = anomaly.Detector(vqvae, prior, parts.get("local"), calibration)
        if detector.calibration is None:
            raise HubError(f"{folder / anomaly.CALIBRATION_NAME}: {detector.calibration_problem}. {rerun}")
        parts[anomaly.CALIBRATION_NAME] = calibration
    if (folder / slicecheck.LIMITS_NAME).is_file():
        limits, problem = slicecheck.read_limits(folder / slicecheck.LIMITS_NAME, vqvae, prior)
        if limits is None:
            raise HubError(f"{folder / slicecheck.LIMITS_NAME}: {problem}. {rerun}")
        parts[slicecheck.LIMITS_NAME] = limits
    if not parts:
        raise HubError(f"{folder} holds no anomaly files (local/, prior/, {anomaly.CALIBRATION_NAME}, "
                       f"{slicecheck.LIMITS_NAME}); pass the folder bench/anomaly.py wrote, or --no-anomaly.")
    return parts


def push_bundle(folder: Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the Hub repository if needed and upload the bundle's card and checkpoints; returns the commit URL."""
    repo_id, folder = validate_repo_id(repo_id), Path(folder)
    load_bundle(folder)  # never publish a bundle that does not load
    api = HfApi(endpoint=_endpoint(), token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload BrainVQ checkpoints",
                                 allow_patterns=["README.md", *VQVAE_FILES, *PRIOR_FILES, *ANOMALY_FILES])
    except Exception as error:  # noqa: BLE001 - explain() sorts every failure
        raise explain(error, repo_id) from error
    return info.commit_url


def main(argv: list[str] | None = None) -> int:
    """CLI: ``export`` a bundle with a model card, or ``push`` one to the Hub."""
    parser = argparse.ArgumentParser(prog="python -m brainvq.hub", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="copy checkpoints into a Hub-ready folder with a model card")
    export.add_argument("--out", required=True, type=Path, help="folder to write")
    export.add_argument("--vqvae", type=Path, default=BUNDLED_DIR / "vqvae", help="VQ-VAE checkpoint folder")
    export.add_argument("--pixelcnn", type=Path, default=BUNDLED_DIR / "pixelcnn", help="PixelCNN checkpoint folder")
    export.add_argument("--no-pixelcnn", action="store_true", help="export the VQ-VAE alone")
    export.add_argument("--anomaly", type=Path, help="anomaly folder (local and scoring priors, calibration, "
                                                     "upload-check limits; default: anomaly/ beside --pixelcnn, "
                                                     "when there is one)")
    export.add_argument("--no-anomaly", action="store_true", help="leave the anomaly files out")
    export.add_argument("--repo-id", default=default_repo_id(), help="repository named in the model card")
    push = sub.add_parser("push", help="upload an exported folder to the Hub (HF_TOKEN or --token)")
    push.add_argument("--folder", required=True, type=Path)
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN / login)")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            prior = None if args.no_pixelcnn else args.pixelcnn
            beside = prior.parent / anomaly.ANOMALY_DIR if prior is not None else None
            folder = None if args.no_anomaly or prior is None else args.anomaly or (beside if beside.is_dir() else None)
            out = export_bundle(args.out, args.vqvae, prior, args.repo_id, folder)
            what = "VQ-VAE + PixelCNN" + (" + anomaly files" if folder else "") if prior else "VQ-VAE only"
            print(f"exported {what} with a model card to {out}")
        else:
            print(push_bundle(args.folder, args.repo_id, token=args.token, private=args.private))
    except (HubError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoint folders on the Hugging Face Hub's conventions: ``model.safetensors`` + ``config.json`` + a model card.

Both models inherit :class:`HubModel`, so ``save_pretrained``, ``push_to_hub`` and the model card come from
``huggingface_hub.PyTorchModelHubMixin``. Two parts are ours: ``_save_pretrained`` (the mixin's documented hook)
writes the weights, then config.json, each atomically; ``from_pretrained`` loads only safetensors (the mixin would
fall back to a pickled ``pytorch_model.bin``) and turns every bad file into a CheckpointError that names it.

config.json: ``{"kind": "vqvae" | "pixelcnn", "arch": the hyper-parameters, ...}`` plus free metadata ("data",
"train", "metrics", fingerprints). A run folder may also hold ``training_state.safetensors`` + ``.json``
(optimizer, RNG, history) for ``--resume``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from brainvq.io import atomic_write_bytes, atomic_write_json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STATE_NAME = "training_state.safetensors"
STATE_JSON = "training_state.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
MODEL_CARD = (Path(__file__).with_name("model_card.md")).read_text()

M = TypeVar("M", bound="HubModel")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model it is loaded into."""


class HubModel(PyTorchModelHubMixin, library_name="pytorch", license="mit", model_card_template=MODEL_CARD,
               tags=["brainvq", "vq-vae", "pixelcnn", "mri"]):
    """save_pretrained / from_pretrained / push_to_hub for the models (subclasses set kind, label, config_class)."""

    kind: ClassVar[str]
    label: ClassVar[str]
    config_class: ClassVar[type]
    meta: dict[str, Any] = {}  # the config.json of the last save or load (replaced, never edited in place)

    def checkpoint_config(self) -> dict[str, Any]:
        """What config.json holds: kind and arch (always this model's), then the metadata of the last save or load."""
        extra = {key: value for key, value in self.meta.items() if key not in ("kind", "arch")}
        return {"kind": self.kind, "arch": asdict(self.cfg), **extra}

    def save(self, folder: str | os.PathLike, **meta: Any) -> Path:
        """``save_pretrained(folder)``, recording ``meta`` (data, train, metrics, ...) in config.json."""
        self.meta = meta
        self.save_pretrained(folder)
        return Path(folder)

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's hook: weights, then config.json (a folder with a config is complete), each atomically."""
        write_tensors(save_directory / WEIGHTS_NAME, self.state_dict())
        atomic_write_json(save_directory / CONFIG_NAME, self.checkpoint_config())

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The mixin's card (brainvq/model_card.md) from this model's config; kwargs add a bundle's other model."""
        configs = {self.kind: self.checkpoint_config(), **kwargs}
        rows = [(label, key, value) for label, name in (("VQ-VAE", "vqvae"), ("PixelCNN", "pixelcnn"))
                for key, value in ((configs.get(name) or {}).get("metrics") or {}).items()]
        return super().generate_model_card(*args, metrics=rows, **configs)

    @classmethod
    def from_pretrained(cls: type[M], pretrained_model_name_or_path: str | os.PathLike, *, map_location: str = "cpu",
                        **download: Any) -> M:
        """Load a folder written by save_pretrained, or a Hub repository id fetched by snapshot_download(**download)
        (revision, cache_dir, token, local_files_only, endpoint). A Path or an existing folder is always local."""
        folder = pretrained_model_name_or_path
        if not _is_local(folder):
            try:
                folder = snapshot_download(str(folder), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], **download)
            except Exception as error:  # noqa: BLE001 - brainvq.hub.explain sorts every Hub failure
                from brainvq.hub import explain  # brainvq.hub imports the models, so it cannot be imported above
                reason = explain(error, str(folder), download.get("revision") or "main", download.get("endpoint"))
                raise CheckpointError(f"{str(folder)!r} is no folder here; as a Hub repository: {reason}") from error
        config = read_config(folder)
        if config["kind"] != cls.kind:
            raise CheckpointError(f"{str(folder)!r} holds a {config['kind']!r} checkpoint, not a {cls.label}.")
        try:
            model = cls(cls.config_class.from_dict(config["arch"]))
        except (AttributeError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{str(Path(folder) / CONFIG_NAME)!r} has a malformed 'arch' entry ({error})."
                                  ) from error
        load_weights(model, folder)
        model.meta = config
        return model.to(map_location).eval()


def _is_local(name: str | os.PathLike) -> bool:
    """A Path, an existing folder, or text that cannot be a Hub repository id."""
    if isinstance(name, os.PathLike) or os.path.isdir(name):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _missing(path: Path) -> str:
    """Message for a missing checkpoint file, pointing out pickle files that we refuse to load."""
    folder = path.parent
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    hint = (f" It holds {', '.join(pickles)}: pickle files are never loaded, since unpickling can run code. "
            "Convert them to safetensors.") if pickles else ""
    return f"{str(path)!r} is missing: a checkpoint folder needs {WEIGHTS_NAME} and {CONFIG_NAME}.{hint}"


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors as safetensors, atomically."""
    blob = save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})
    atomic_write_bytes(path, lambda file: file.write(blob))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning every failure into a CheckpointError that names the file."""
    if not path.is_file():
        raise CheckpointError(_missing(path))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({error}). It may be truncated or "
                              "not a safetensors file at all; re-download it or re-export the checkpoint.") from error


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Parse a checkpoint's config.json with a clear error when it is missing or malformed."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(_missing(path))
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({error}).") from error
    if not isinstance(config, dict) or "kind" not in config or "arch" not in config:
        raise CheckpointError(f"{str(path)!r} lacks the 'kind' and 'arch' entries of a BrainVQ checkpoint config.")
    return config


def load_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Load model.safetensors into ``model``, naming every missing, unexpected or mis-shaped tensor."""
    path = Path(folder) / WEIGHTS_NAME
    state = read_tensors(path)
    expected = model.state_dict()
    problems = [f"missing tensor {name}" for name in expected if name not in state]
    problems += [f"unexpected tensor {name}" for name in state if name not in expected]
    problems += [f"{name} has shape {tuple(state[name].shape)} but the config implies {tuple(t.shape)}"
                 for name, t in expected.items() if name in state and state[name].shape != t.shape]
    if problems:
        raise CheckpointError(f"{str(path)!r} does not match {CONFIG_NAME}: " + "; ".join(problems[:5])
                              + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
    model.load_state_dict(state)


def save_training_state(folder: str | os.PathLike, optimizer: torch.optim.Optimizer, extra: dict[str, Any],
                        tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Optimizer and RNG state as safetensors plus JSON, for --resume without pickle."""
    folder = Path(folder)
    opt = optimizer.state_dict()
    flat = {f"opt.{index}.{key}": value for index, slots in opt["state"].items()
            for key, value in slots.items() if torch.is_tensor(value)}
    flat["rng.torch"] = torch.get_rng_state()
    flat.update(tensors or {})
    write_tensors(folder / STATE_NAME, flat)
    atomic_write_json(folder / STATE_JSON, {"param_groups": opt["param_groups"], **extra})


def load_training_state(folder: str | os.PathLike, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore optimizer and torch RNG; return the JSON extras and any other saved tensors."""
    folder = Path(folder)
    try:
        extra = json.loads((folder / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"Cannot resume: {str(folder / STATE_JSON)!r} is missing or corrupt ({error}).") from error
    flat = read_tensors(folder / STATE_NAME)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in flat.items():
        if name.startswith("opt."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": extra.pop("param_groups")})
    torch.set_rng_state(flat["rng.torch"])
    return extra, {k: v for k, v in flat.items() if not k.startswith(("opt.", "rng."))}

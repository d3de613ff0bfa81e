"""Which layers of a model are read out, and their names in the lake's ``layer`` column."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlray.catalog import CatalogError, ModelSpec
from vlray.models.weights import hf_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def default_vision_taps(model: torch.nn.Module) -> list[str]:
    """Every stage of a timm model: stem output, each block/stage, and the CNN head.

    Works for the families timm names alike: ``blocks.N`` (EfficientNet, ViT), ``stages.N``
    (ConvNeXt, Swin), ``layerN`` (ResNet).
    """
    names = dict(model.named_modules())
    taps: list[str] = []
    if "conv_stem" in names and "bn1" in names:
        taps.append("bn1")  # EfficientNet-style stem: conv_stem -> bn1 (BN + activation)
    elif "conv1" in names and "act1" in names:
        taps.append("act1")  # ResNet-style stem
    for container in ("blocks", "stages"):
        if container in names:
            taps += [f"{container}.{i}" for i in range(len(names[container]))]
            break
    else:
        taps += [f"layer{i}" for i in range(1, 5) if f"layer{i}" in names]
    if "conv_head" in names and "bn2" in names:
        taps.append("bn2")  # EfficientNet head conv (1280 wide)
    if not taps:
        raise CatalogError(
            "cannot find this model's layers; list them in the catalog (layers: [...])"
        )
    return taps


def hf_vision_taps(model: torch.nn.Module) -> list[str]:
    """Every transformer block of a Hugging Face vision encoder: ``stages.S.blocks.B``
    (SegFormer / Mix Transformer) or ``encoder.layer.N`` (ViT, DINOv2, BEiT, ...)."""
    names = dict(model.named_modules())
    stages = [n for n in names if n.startswith("stages.") and n.count(".") == 3]
    taps = [n for n in stages if n.split(".")[2] == "blocks"]
    if not taps:
        taps = [n for n in names if n.startswith("encoder.layer.") and n.count(".") == 2]
    if not taps:
        raise CatalogError(
            "cannot find this model's layers; list them in the catalog (layers: [...])"
        )
    return taps


def vision_layer_names(spec: ModelSpec, model: torch.nn.Module) -> list[str]:
    """The layers of a built vision model that ``spec`` taps: its catalog list, else every
    stage or block."""
    if spec.layers != "all":
        return [str(x) for x in spec.layers]
    return hf_vision_taps(model) if spec.source == "hf" else default_vision_taps(model)


def hidden_state_name(index: int) -> str:
    """A language model's layer name for a hidden-state index: ``embeddings``, ``layer.N``."""
    return "embeddings" if index == 0 else f"layer.{index - 1}"


def hidden_state_indices(spec: ModelSpec, config: PretrainedConfig) -> list[int]:
    """Which of ``output_hidden_states`` (embeddings, then each block) a spec taps."""
    n_hidden = int(config.num_hidden_layers) + 1
    if spec.layers == "all":
        return list(range(n_hidden))
    indices = [int(x) for x in spec.layers]
    bad = [i for i in indices if not 0 <= i < n_hidden]
    if bad:
        raise CatalogError(f"model '{spec.name}': layers {bad} out of range 0..{n_hidden - 1}")
    return indices


def layer_names(spec: ModelSpec) -> list[str]:
    """A model's tapped layers, in ``layer`` column order, without loading any weights."""
    if spec.modality == "vision":
        with torch.device("meta"):  # structure only: no memory, no weights
            if spec.source == "hf":
                from transformers import AutoModel

                model = AutoModel.from_config(hf_config(spec))
            else:
                import timm

                model = timm.create_model(spec.arch or spec.id, pretrained=False, **spec.kwargs)
        return vision_layer_names(spec, model)
    return [hidden_state_name(i) for i in hidden_state_indices(spec, hf_config(spec))]

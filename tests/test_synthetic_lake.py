"""The planted lake (vlray.bench.synthetic): rows like a real extraction's, read back by the
real alignment job, which finds the planted peak; the same arguments write the same values."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from vlray.align import AlignOptions, run_align
from vlray.bench.synthetic import PlantedLake, write_planted_lake
from vlray.lake import Lake

pytestmark = pytest.mark.timeout(120)

METRICS = ("cka", "mutual_knn")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> PlantedLake:
    # Two captions an image: the language side alignment reads is their mean.
    uri = str(tmp_path_factory.mktemp("planted") / "lake")
    return write_planted_lake(uri, n=200, layers=(5, 4), widths=(32, 24), captions=2)


def _embeddings(uri: str):
    columns = ["model", "layer", "item_id", "modality", "pooling", "perturbation", "embedding"]
    table = Lake(uri).read("embeddings", columns=columns)
    return table.sort_by([("model", "ascending"), ("layer", "ascending"), ("item_id", "ascending")])


def test_the_manifest_records_both_models_like_an_extraction(planted):
    assert planted.peak == (3, 2)  # about two thirds of each depth
    assert planted.embeddings_bytes() == 4 * 200 * (5 * 32 + 2 * 4 * 24)
    records = {r["model"]: r for r in Lake(planted.uri).manifest().to_pylist()}
    assert set(records) == {"planted_vision", "planted_language"}
    vision, language = records["planted_vision"], records["planted_language"]
    assert vision["layers"] == 5 and language["layers"] == 4
    assert vision["layer_names"] == [f"blocks.{i}" for i in range(5)]
    assert language["layer_names"] == ["embeddings", "layer.0", "layer.1", "layer.2"]
    assert (vision["items"], language["items"]) == (200, 400)
    assert (vision["rows"], language["rows"]) == (200 * 5, 400 * 4)
    for record in (vision, language):
        assert record["dataset"] == "planted" and record["perturbation"] == "none"
        assert record["init"] == "pretrained"
        # What extraction records: the spec's fingerprint, then the items partition's.
        spec = planted.vision if record is vision else planted.language
        assert record["config_hash"] == f"{spec.fingerprint()}-{record['items_fingerprint']}"


def test_the_embeddings_table_holds_n_rows_per_layer_and_n_times_captions_per_caption_layer(
    planted,
):
    table = _embeddings(planted.uri)
    counts = {
        (r["model"], r["layer"]): r["count_all"]
        for r in table.group_by(["model", "layer"]).aggregate([([], "count_all")]).to_pylist()
    }
    assert counts == {("planted_vision", layer): 200 for layer in range(5)} | {
        ("planted_language", layer): 400 for layer in range(4)
    }
    assert set(table["pooling"].to_pylist()) == {"mean"}
    assert set(table["perturbation"].to_pylist()) == {"none"}
    widths = pc.list_value_length(table["embedding"]).to_numpy()
    is_vision = pc.equal(table["model"], "planted_vision").to_numpy(zero_copy_only=False)
    assert set(widths[is_vision]) == {32} and set(widths[~is_vision]) == {24}
    # Captions pair with their image through pair_id, as a captions source writes them.
    items = Lake(planted.uri).read_items("planted").to_pylist()
    roles = {(r["modality"], r["role"]) for r in items}
    assert roles == {("image", "scene"), ("text", "caption")}
    assert all(r["pair_id"] == r["item_id"].split("#")[0] for r in items)


def test_alignment_finds_the_planted_peak(ray_session, planted):
    options = AlignOptions(studies=("layerwise",), metrics=METRICS, bootstrap=0, permutations=0)
    (done,) = run_align(planted.uri, [planted.dataset], [planted.vision, planted.language], options)
    assert done["studies"]["layerwise"]["n"] == planted.n, done
    rows = Lake(planted.uri).read("alignment", {"study": "layerwise"}).to_pylist()
    for metric in METRICS:
        scores = np.full(planted.layers, np.nan)
        for r in rows:
            if r["metric"] == metric:
                scores[r["vision_layer"], r["language_layer"]] = r["value"]
        assert not np.isnan(scores).any()
        assert np.unravel_index(np.argmax(scores), scores.shape) == planted.peak, (metric, scores)
        # Two layers from the peak on either side, alignment is clearly lower.
        v, t = planted.peak
        far = [scores[i, j] for i in range(5) for j in range(4) if max(abs(i - v), abs(j - t)) >= 2]
        assert max(far) < 0.75 * scores[v, t], (metric, scores)


def test_the_same_arguments_write_the_same_embeddings(tmp_path):
    uri = str(tmp_path / "lake")
    args = dict(n=40, layers=(3, 2), widths=(8, 16), captions=3, seed=7)
    write_planted_lake(uri, **args)
    first, version = _embeddings(uri), Lake(uri).version()
    write_planted_lake(uri, **args)
    assert Lake(uri).version() > version  # rewritten, not skipped
    assert _embeddings(uri).equals(first)
    write_planted_lake(str(tmp_path / "other"), **{**args, "seed": 8})
    assert not _embeddings(str(tmp_path / "other")).equals(first)


def test_an_s3_lake_gets_the_same_rows_as_a_local_one(s3_lake, tmp_path):
    args = dict(n=20, layers=(2, 2), widths=(8, 8), captions=2)
    planted = write_planted_lake(s3_lake, **args)
    assert planted.uri == s3_lake
    assert len(Lake(s3_lake).manifest()) == 2
    write_planted_lake(str(tmp_path / "local"), **args)
    assert _embeddings(s3_lake).equals(_embeddings(str(tmp_path / "local")))


@pytest.mark.parametrize(
    "kwargs",
    [{"layers": (3, 2), "peak": (3, 0)}, {"n": 2}, {"widths": (0, 8)}, {"captions": 0}],
)
def test_impossible_arguments_are_refused_before_anything_is_written(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_planted_lake(str(tmp_path / "lake"), **kwargs)
    assert not (tmp_path / "lake").exists()

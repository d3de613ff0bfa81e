"""`vlray refresh`: only what is new or stale, and nothing at all when nothing changed."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import vlray.align
import vlray.pipeline
from vlray.cli import main
from vlray.sql import connect, run_query

from .conftest import SMALL_WORLD, lake_files

pytestmark = pytest.mark.timeout(420)


def _config(path, catalog: str | None = None) -> str:
    world = ", ".join(f"{k}: {v}" for k, v in SMALL_WORLD.items())
    text = (
        f"datasets: [{{name: shapes, source: shapes, params: {{{world}}}}}]\n"
        "models: [tiny_vit_random, tiny_gpt2_random]\n"
        "align: {metrics: [cka], bootstrap: 0, permutations: 0, studies: [layerwise]}\n"
    )
    if catalog:
        text += f"catalog: [{catalog}]\n"
    path.write_text(text)
    return str(path)


def _refresh_in_a_process(config: str, lake: str) -> subprocess.CompletedProcess:
    """`vlray refresh` as a user runs it: its own process, its own stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "vlray.cli", "refresh", "--config", config, "--lake", lake],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_refresh_does_only_what_changed(small_lake, tmp_path, capsys, monkeypatch):
    source, _ = small_lake
    lake = str(tmp_path / "lake")
    shutil.copytree(source, lake)
    config = _config(tmp_path / "refresh.yaml")

    # Embeddings are there already (one line says so); the alignment of the pair with these
    # options is not.
    assert main(["refresh", "--config", config, "--lake", lake]) == 0
    out = capsys.readouterr().out
    assert (
        "extract: nothing new; the embeddings of 2 model(s) on 1 dataset(s) are up to date" in out
    )
    assert "up to date (nothing to do)" not in out  # no line per model when it did nothing
    assert "align: 1 model pair(s), 9 scores" in out

    # Nothing new: nothing is computed, not a file is touched, Ray is not even started, and
    # one line says so.
    before = lake_files(lake)

    def no_ray() -> None:
        raise AssertionError("a refresh with nothing new started Ray")

    with monkeypatch.context() as patched:
        patched.setattr(vlray.pipeline, "ensure_ray", no_ray)
        patched.setattr(vlray.align, "ensure_ray", no_ray)
        assert main(["refresh", "--config", config, "--lake", lake]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1, out
    assert out.startswith(
        "refresh: nothing new; the lake is up to date (1 dataset(s), 2 model(s), "
        "1 model pair(s) checked in "
    ), out
    # The same from the command line: that one line on stdout, and nothing at all on stderr.
    done = _refresh_in_a_process(config, lake)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1, done.stdout
    assert done.stdout.startswith("refresh: nothing new; the lake is up to date ("), done.stdout
    assert done.stderr == ""
    assert lake_files(lake) == before

    # A changed layer config makes that model's partitions stale: they are recomputed and
    # replaced (not duplicated), and only the pairs involving it are re-aligned.
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "tiny_gpt2_random:\n  modality: language\n  source: hf\n  id: gpt2\n  init: random\n"
        "  pooling: [last_token, mean]\n  tokenizer: minilm_l6\n  layers: [0, 2]\n"
        "  kwargs: {n_layer: 2, n_embd: 64, n_head: 2, vocab_size: 30522, n_positions: 128,"
        " bos_token_id: 101, eos_token_id: 102}\n"
    )
    changed = _config(tmp_path / "changed.yaml", catalog=str(catalog))
    assert main(["refresh", "--config", changed, "--lake", lake]) == 0
    out = capsys.readouterr().out
    assert "tiny_vit_random" in out and out.count("up to date (nothing to do)") == 1
    assert "align: 1 model pair(s), 6 scores" in out  # 3 vision layers x 2 language layers
    con = connect(lake)
    layers = (
        run_query(
            con,
            "SELECT DISTINCT layer FROM embeddings WHERE model = 'tiny_gpt2_random' ORDER BY layer",
        )
        .column("layer")
        .to_pylist()
    )
    assert layers == [0, 1]  # two tapped layers now, numbered in order; old rows gone
    dup = run_query(
        con,
        "SELECT count(*) AS n FROM (SELECT item_id, layer, pooling, "
        "perturbation FROM embeddings WHERE model = 'tiny_gpt2_random' "
        "GROUP BY ALL HAVING count(*) > 1)",
    ).to_pylist()[0]["n"]
    assert dup == 0


def test_changed_items_recompute_only_their_own_partitions(small_lake, tmp_path, capsys):
    # Two more context sentences per concept change only the text items of the unperturbed
    # partition: the image model and the text model's perturbed partitions stay as they are.
    source, _ = small_lake
    lake = str(tmp_path / "lake")
    shutil.copytree(source, lake)
    world = dict(SMALL_WORLD, sentences_per_concept=SMALL_WORLD["sentences_per_concept"] + 2)
    config = tmp_path / "more-sentences.yaml"
    config.write_text(
        "datasets: [{name: shapes, source: shapes, params: {"
        + ", ".join(f"{k}: {v}" for k, v in world.items())
        + "}}]\nmodels: [tiny_vit_random, tiny_gpt2_random]\n"
    )
    before = lake_files(lake)
    assert main(["extract", "--config", str(config), "--lake", lake]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date (nothing to do)") == 1 and "tiny_vit_random" in out
    after = lake_files(lake)

    def changed(model: str, perturbation: str | None = None) -> bool:
        part = f"/model={model}/" + (f"perturbation={perturbation}/" if perturbation else "")
        old = {f: t for f, t in before.items() if "/embeddings/" in f and part in f}
        new = {f: t for f, t in after.items() if "/embeddings/" in f and part in f}
        assert new, part
        return old != new

    assert not changed("tiny_vit_random")
    assert changed("tiny_gpt2_random", "none")
    perturbed = {
        f.split("/perturbation=")[1].split("/")[0]
        for f in after
        if "/model=tiny_gpt2_random/" in f and "/perturbation=" in f
    } - {"none"}
    assert perturbed and not any(changed("tiny_gpt2_random", p) for p in perturbed)
    sentences = run_query(
        connect(lake),
        "SELECT count(DISTINCT item_id) AS n FROM embeddings "
        "WHERE model = 'tiny_gpt2_random' AND pooling = 'word_span'",
    ).to_pylist()[0]["n"]
    items = run_query(
        connect(lake), "SELECT count(*) AS n FROM items WHERE role = 'context'"
    ).to_pylist()[0]["n"]
    assert sentences == items  # the new sentences were embedded

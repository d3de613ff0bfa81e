"""The README's bring-your-own-data sequence, run as written: 20 real photos with captions and
4 bad rows, extract, align with no config, report, a SQL question; then its config example."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

from vlray.cli import main

pytestmark = pytest.mark.timeout(900)

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> str:
    """The fenced code between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""
    text = README.read_text()
    block = rf"<!-- {name}:start -->\s*```\w*\n(.*?)```\s*<!-- {name}:end -->"
    found = re.search(block, text, re.S)
    assert found, f"README.md has no block marked {name}"
    return found.group(1)


def run_line(line: str) -> int:
    """One command of the block, as a user's shell would run it (comments dropped)."""
    words = shlex.split(line, comments=True)
    if not words or words[0] == "source":
        return 0
    if words[:3] == ["python", "-m", "vlray.sample_photos"]:
        from vlray.sample_photos import write

        write(words[3])
        return 0
    assert words[0] == "vlray", f"README line not runnable here: {line}"
    return main(words[1:])


@pytest.fixture(scope="module")
def own_data(ray_session, tmp_path_factory):
    """Every line of the README's sequence, in a fresh folder; stdout per command (captured
    by hand: capsys is per test, this runs once per module)."""
    folder = tmp_path_factory.mktemp("own-data")
    outputs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        for line in readme_block("bring-your-own").splitlines():
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = run_line(line)
            assert status == 0, f"{line}\n{out.getvalue()}\n{err.getvalue()}"
            words = shlex.split(line, comments=True)
            if words:
                outputs[words[1] if words[0] == "vlray" else words[0]] = out.getvalue()
    return folder, outputs


def test_extract_quarantines_the_bad_rows_and_names_them(own_data):
    folder, out = own_data
    text = out["extract"]
    assert "quarantine" in text
    for reason in ("missing", "truncated", "cannot identify", "caption"):
        assert reason in text.lower(), text
    assert "SELECT" in text and "FROM quarantine" in text  # the query that lists them all


def test_align_without_config_fits_the_small_dataset_and_warns(own_data):
    _, out = own_data
    text = out["align"]
    assert re.search(r"align: pairs has 20 items; mutual_knn with k=\d+", text), text
    assert "pairs | efficientnet_lite0 x minilm_l6" in text
    assert "warning: scores from only 20 items, below the documented minimum of 100" in text
    assert "FAILED" not in text


def test_report_shows_quarantine_small_n_and_honest_verdicts(own_data):
    folder, out = own_data
    html = (folder / "my-report" / "index.html").read_text()
    assert "Quarantined rows" in html and "Skipped, failed and small-n studies" in html
    assert "small_n" in html
    # 20 photos cannot separate the pretrained pair from its controls: said so
    assert "not significant" in html
    assert "[holds] Pretrained pair beats random-init controls" not in out["report"]


def test_sql_question_answers(own_data):
    _, out = own_data
    assert "efficientnet_lite0" in out["sql"] and "peak" in out["sql"]


def test_config_example_validates_and_runs(own_data, capsys):
    from vlray.config import validate_config

    folder, _ = own_data
    text = readme_block("byo-config")
    config = validate_config(yaml.safe_load(text), "README config")
    assert config.align.metric_kwargs == {"mutual_knn": {"k": 5}}
    path = folder / "my-photos.yaml"
    path.write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        # as written, with fewer resamples to keep the suite short
        flags = ["--studies", "layerwise", "--bootstrap", "10", "--permutations", "10"]
        assert main(["align", "--config", str(path), *flags]) == 0
    text = capsys.readouterr().out
    assert "n=20" in text and "skipped" not in text

"""``vlray`` says an error of its own (``vlray.errors.VlrayError``) in one line, exit status 2,
with its traceback under ``--debug``; any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import pytest
import yaml

import vlray.cli
from vlray.catalog import CatalogError
from vlray.cli import main
from vlray.config import ConfigError
from vlray.embeddings import EmbeddingsNotFound
from vlray.errors import UsageError, VlrayError, one_line
from vlray.images import ImageError
from vlray.lake import LakeError
from vlray.metrics.inputs import MetricInputError
from vlray.models import WeightsUnavailable
from vlray.report.data import NoResultsError, ReportError
from vlray.sources import SourceError
from vlray.sources.manifest import ManifestError
from vlray.sql import QueryError


@pytest.mark.parametrize(
    "error, builtin",
    [
        (ConfigError, ValueError),
        (CatalogError, ValueError),
        (WeightsUnavailable, ValueError),
        (LakeError, RuntimeError),
        (ReportError, ValueError),
        (NoResultsError, ValueError),
        (MetricInputError, ValueError),
        (ImageError, ValueError),
        (QueryError, ValueError),
        (SourceError, ValueError),
        (ManifestError, ValueError),
        (EmbeddingsNotFound, LookupError),
        (UsageError, ValueError),
    ],
)
def test_every_error_of_vlray_is_a_vlray_error_and_keeps_its_builtin_base(error, builtin):
    assert issubclass(error, VlrayError) and issubclass(error, builtin)


def test_a_vlray_error_is_one_line(capsys):
    assert main(["extract"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "vlray: error: give --config FILE, or --manifest FILE --root DIR --models NAME,NAME\n"
    )
    assert not captured.out


def test_debug_shows_the_traceback_of_a_vlray_error_too(capsys):
    assert main(["--debug", "extract"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-2].startswith("vlray.errors.UsageError: give --config FILE")
    assert lines[-1].startswith("vlray: error: give --config FILE")


def test_a_bad_source_parameter_is_one_line(tmp_path, capsys):
    """A source's parameter is checked when the source runs (here before any model job)."""
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "datasets": [{"name": "s", "source": "shapes", "params": {"n_scenes": -1}}],
                "models": ["tiny_vit_random"],
            }
        )
    )
    assert main(["extract", "--config", str(config), "--lake", str(tmp_path / "lake")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlray: error: ") and "n_scenes must be >= 0, got -1" in err
    assert len(err.splitlines()) == 1, err


def test_any_other_error_keeps_its_traceback(monkeypatch):
    """A ValueError that is no VlrayError (from inside numpy or pyarrow, say) is a bug: it is
    not turned into a line, with or without --debug."""

    def broken(args):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(vlray.cli, "cmd_models", broken)
    for argv in (["models"], ["--debug", "models"]):
        with pytest.raises(ValueError, match="could not be broadcast"):
            main(argv)


def test_one_line_collapses_a_message_and_names_a_silent_error():
    # The one helper behind every "cannot read X: <cause>" line of the images, sources and lake.
    assert one_line(OSError("no such\n  file:\t'a b'")) == "no such file: 'a b'"
    assert one_line(TimeoutError()) == "TimeoutError"
    long = one_line(ValueError("x" * 400), limit=300)
    assert len(long) == 300 and long.endswith("...")
    assert one_line(ValueError("x" * 400)) == "x" * 400
    from vlray.lake.storage import _one_line

    assert _one_line(ValueError("y" * 400)) == "y" * 297 + "..."

"""One definition per idea: each of these tests fails if a second copy of a definition appears
or drifts (option defaults, study names, the validation-error format, ...)."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import vlray
import vlray.sql
import vlray.studies
from vlray.config import ConfigError, RunConfig, check_align, validate_config
from vlray.options import AlignOptions, ExtractOptions
from vlray.studies import STUDIES, STUDY_NAMES

PACKAGE = Path(vlray.__file__).parent


def _sources() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(PACKAGE.parent)): ast.parse(path.read_text())
        for path in PACKAGE.rglob("*.py")
    }


def test_the_config_sections_are_the_runtime_options():
    # By construction, not by comparing two lists: the YAML's extract:/align: sections are
    # validated into the very classes the extraction and alignment jobs take.
    assert RunConfig.model_fields["extract"].annotation is ExtractOptions
    assert RunConfig.model_fields["align"].annotation is AlignOptions
    config = validate_config(
        {"datasets": [{"name": "d", "source": "shapes"}], "models": ["minilm_l6"]}, "test"
    )
    assert config.extract == ExtractOptions() and config.align == AlignOptions()


def test_no_other_class_declares_the_options_fields():
    # A second schema of the options (a dataclass or model repeating their fields) would drift.
    fields = set(ExtractOptions.model_fields) | set(AlignOptions.model_fields)
    for where, tree in _sources().items():
        if where == "vlray/options.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                declared = {
                    s.target.id
                    for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                }
                shared = declared & fields
                assert len(shared) < 4, f"{where}: class {node.name} repeats {sorted(shared)}"


def test_validating_a_config_does_not_load_ray():
    code = (
        "import sys\n"
        "from vlray.config import validate_config\n"
        "validate_config({'datasets': [{'name': 'd', 'source': 'shapes'}],"
        " 'models': ['minilm_l6'], 'align': {'studies': ['layerwise']}}, 'x')\n"
        "print(sorted(m for m in ('ray', 'ray.data', 'vlray.extract', 'vlray.shards')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_study_registry_is_the_only_list_of_studies():
    # Every study module has its registry entry, and every entry its module.
    modules = {m.name for m in pkgutil.iter_modules(vlray.studies.__path__)} - {"inputs"}
    assert modules == set(STUDY_NAMES)
    for study in STUDIES.values():
        assert callable(study.module.run) and study.small_n.n > 0
    # The config's schema and the report read the registry.
    with pytest.raises(ConfigError, match="field 'align.studies.0'.*'layerwise'"):
        check_align({"studies": ["nope"]}, "test")
    from vlray.report.data import STUDY_TITLES

    assert list(STUDY_TITLES) == list(STUDY_NAMES)
    # No other module spells out the list of study names.
    for where, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                names = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                assert len(names & set(STUDY_NAMES)) < 3, f"{where}:{node.lineno} lists studies"


def test_one_formatter_of_validation_errors():
    # Pydantic's error list is turned into "WHERE: field 'a.b': message" lines in one place.
    users = [
        f"{where}:{node.lineno}"
        for where, tree in _sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "errors"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "err"
    ]
    assert users == [f"vlray/options.py:{_line('vlray/options.py', 'err.errors()')}"]
    from vlray.catalog import CatalogError, parse_catalog

    with pytest.raises(CatalogError, match=r"model 'm': field 'modality': Input should be"):
        parse_catalog({"m": {"modality": "sound", "source": "timm", "id": "x"}}, "cat")


def _line(where: str, text: str) -> int:
    lines = (PACKAGE.parent / where).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def test_one_content_hash():
    # fingerprints, config and inputs hashes and content ids all come from vlray/hashing.py
    users = sorted(
        where
        for where, tree in _sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        and any(alias.name == "hashlib" for alias in node.names)
        or isinstance(node, ast.ImportFrom)
        and node.module == "hashlib"
    )
    assert users == ["vlray/hashing.py"]


def test_no_query_parses_a_metric_or_condition_label():
    # The typed columns (vlray.results.Metric, Condition) are what SQL filters and groups on;
    # only the lake upgrade reads the legacy labels.
    label_parse = ("regexp_", "split_part", "string_split", "str_split", "LIKE '%")
    for path in vlray.sql.SQL_DIR.rglob("*.sql"):
        text = path.read_text()
        for needle in label_parse:
            assert needle not in text, f"{path.name} parses a label with {needle}"


def test_poolings_have_one_registry():
    from vlray.catalog import ModelSpec
    from vlray.pooling import POOLING_FUNCTIONS, POOLINGS

    assert POOLINGS == tuple(POOLING_FUNCTIONS)
    for name in POOLINGS:
        if name != "word_span":  # chosen per row by extraction, not by a catalog entry
            ModelSpec(name="m", modality="language", source="hf", id="x", pooling=[name])
    with pytest.raises(ValueError, match="pooling must be"):
        ModelSpec(name="m", modality="language", source="hf", id="x", pooling=["max"])


def test_one_definition_of_the_calibrated_scores():
    # calibrated = value - null_mean and z_score = calibrated / null_sd are made by
    # vlray.results.calibrate alone (score_row and the lake upgrade call it); no other module
    # subtracts a null mean or divides by a null spread, and no query recomputes them from
    # the value (they are columns of the alignment view).
    from vlray.results import Condition, calibrate, score_row

    def named(node: ast.AST, name: str) -> bool:
        return (
            isinstance(node, ast.Name)
            and node.id == name
            or isinstance(node, ast.Attribute)
            and node.attr == name
            or isinstance(node, ast.Subscript)
            and isinstance(node.slice, ast.Constant)
            and node.slice.value == name
        )

    makers = sorted(
        {
            where
            for where, tree in _sources().items()
            for node in ast.walk(tree)
            if isinstance(node, ast.BinOp)
            and (
                isinstance(node.op, ast.Sub)
                and (named(node.left, "null_mean") or named(node.right, "null_mean"))
                or isinstance(node.op, ast.Div)
                and named(node.right, "null_sd")
            )
        }
    )
    assert makers == [], f"null-calibrated scores computed outside vlray.results: {makers}"
    callers = sorted(
        where
        for where, tree in _sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            isinstance(node.func, ast.Name)
            and node.func.id == "calibrate"
            or isinstance(node.func, ast.Attribute)
            and node.func.attr == "calibrate"
        )
    )
    assert callers == ["vlray/lake/upgrade.py", "vlray/results.py"]
    for path in vlray.sql.SQL_DIR.rglob("*.sql"):
        code = "\n".join(line.split("--")[0] for line in path.read_text().splitlines())
        text = " ".join(code.lower().split())
        for needle in ("value - null_mean", "value-null_mean", "/ null_sd", "/null_sd"):
            assert needle not in text, f"{path.name} recomputes a calibrated score: {needle}"
    assert calibrate(0.5, 0.25, 0.125) == (0.25, 2.0)
    row = score_row(
        study="layerwise",
        dataset="d",
        vision_model="v",
        language_model="t",
        vision_layer=0,
        language_layer=0,
        metric="cka",
        condition=Condition(),
        value=0.5,
        n=3,
        run_id="r",
        null_mean=0.25,
        null_sd=0.125,
    )
    assert (row["calibrated"], row["z_score"]) == calibrate(0.5, 0.25, 0.125)
    with pytest.raises(TypeError):
        score_row(calibrated=0.1)  # made, never passed in

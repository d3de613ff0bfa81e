"""Shared fixtures: one local Ray for the session, one real S3 endpoint (moto's server on
127.0.0.1, stopped by its pid), and one small lake built by the real job."""

from __future__ import annotations

import os

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import pytest  # noqa: E402
import ray  # noqa: E402

# A small shapes world: every role and perturbation, few rows.
SMALL_WORLD = {
    "seed": 0,
    "n_scenes": 4,
    "exemplars_per_concept": 8,
    "captions_per_image": 1,
    "sentences_per_concept": 2,
}
# Real pretrained weights on the vision side; tiny random configs cover CLS, mean, last-token.
LAKE_MODELS = ["efficientnet_lite0", "minilm_l6", "tiny_vit_random", "tiny_gpt2_random"]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-compatible endpoint for the session; the AWS environment points at it, so
    `s3://BUCKET/...` lakes (and `vlray` processes started with os.environ) reach it."""
    from . import s3

    with s3.running(tmp_path_factory.mktemp("s3")) as endpoint:
        yield endpoint


@pytest.fixture
def s3_lake(s3_endpoint) -> str:
    """A lake URI in a new, empty bucket of the session's endpoint."""
    return f"s3://{s3_endpoint.new_bucket()}/vl"


@pytest.fixture(scope="session")
def ray_session():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def small_config(models: list[str], **extract) -> dict:
    return {
        "datasets": [{"name": "shapes", "source": "shapes", "params": SMALL_WORLD}],
        "models": models,
        "extract": {"batch_size": 32, **extract},
    }


def lake_files(uri: str) -> dict[str, int]:
    """Every object under a lake (data files and Delta logs alike) with its size."""
    from pyarrow.fs import FileSelector, FileType

    from vlray.lake import Lake

    storage = Lake(uri).storage
    infos = storage.fs.get_file_info(
        FileSelector(storage.root, recursive=True, allow_not_found=True)
    )
    return {i.path: i.size for i in infos if i.type == FileType.File}


@pytest.fixture
def empty_lake(tmp_path) -> str:
    """A lake with no table yet: for a test that needs a lake to exist and nothing in it (the
    views, the read-only guard), instead of ``small_lake``'s extraction of four models."""
    path = tmp_path / "lake"
    path.mkdir()
    return str(path)


@pytest.fixture(scope="session")
def small_lake(ray_session, tmp_path_factory):
    """A lake with the small shapes world embedded by LAKE_MODELS, and the run's summary."""
    from vlray.config import validate_config
    from vlray.pipeline import run_extract

    lake = str(tmp_path_factory.mktemp("lake") / "lake")
    summary = run_extract(validate_config(small_config(LAKE_MODELS), "test config"), lake)
    return lake, summary

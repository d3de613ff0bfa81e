"""Joining or starting Ray, the same way for every job."""

from __future__ import annotations

import logging
import os

import ray


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (ray submit / job submit) or start a local one."""
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            log_to_driver=False,
            logging_level=logging.WARNING,
        )

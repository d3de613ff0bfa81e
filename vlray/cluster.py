"""Joining or starting Ray, the same way for every job."""

from __future__ import annotations

import logging
import os
import sys

import ray


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (ray submit / job submit) or start a local one."""
    if not sys.stdout.isatty() and not os.environ.get("VLRAY_DATA_PROGRESS"):
        # Off a terminal, Ray Data logs a dozen progress lines per operator every few seconds,
        # which bury vlray's own summary; VLRAY_DATA_PROGRESS=1 keeps them.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            log_to_driver=False,
            logging_level=logging.WARNING,
        )

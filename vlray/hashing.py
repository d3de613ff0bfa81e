"""The one content hash of vlray: a model spec's fingerprint, a dataset's items fingerprint, a
study's inputs hash and content-derived item ids are all ``content_hash`` of some bytes.

A leaf module (it imports nothing from vlray): the sources at the start of the data chain use
it as well as the lake and alignment at its end.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

# Hex digits kept: 64 bits tell a changed input from an unchanged one, and every hash the lake
# has ever stored has this length (manifest config hashes are "<16 hex>-<16 hex>").
HASH_DIGITS = 16


def content_hash(data: str | bytes | Iterable[Any]) -> str:
    """The first ``HASH_DIGITS`` hex digits of the SHA-256 of ``data``: text (as UTF-8), bytes,
    or an iterable of byte chunks (anything with the buffer protocol: bytes, memoryview,
    ``pyarrow.Buffer``), hashed as their concatenation, so a large table streams through
    without being joined into one object."""
    h = hashlib.sha256()
    if isinstance(data, str):
        h.update(data.encode())
    elif isinstance(data, bytes | bytearray | memoryview):
        h.update(data)
    else:
        for chunk in data:
            h.update(chunk)
    return h.hexdigest()[:HASH_DIGITS]


def json_hash(value: object) -> str:
    """``content_hash`` of ``value`` as canonical JSON (sorted keys, anything JSON lacks as
    its ``str``): equal values hash the same whatever their dict order."""
    return content_hash(json.dumps(value, sort_keys=True, default=str))

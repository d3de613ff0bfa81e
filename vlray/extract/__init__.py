"""Extraction: items -> every layer's embeddings in the lake, with Ray Data.

One Ray Data job per (model, dataset), run by :mod:`.job`. An item's path through it:

1. :mod:`.decode`, CPU tasks: read from the items snapshot's files; an image decoded and
   resized (or only checked, when nvJPEG decodes it on the GPU), a text tokenised.
2. :mod:`.embed`, an actor pool (one model per actor, a GPU each when present): the forward
   pass and every layer's pooled vectors, one row per (item, layer, pooling).
3. :mod:`.sink`, write tasks: one Parquet file per (perturbation, layer) straight into the
   lake's embeddings table, invisible until committed.
4. :mod:`.job`, the driver: one Delta transaction commits every (dataset, model,
   perturbation) partition of the job at once.

A row refused at any stage leaves the stream as a quarantine record with a reason
(:mod:`.quarantine`), and the rest of the run completes.
"""

from vlray.extract.decode import decode_batch, tokenize_batch
from vlray.extract.embed import EmbedActor
from vlray.extract.job import (
    ModelResult,
    config_hash,
    embed_batch_size,
    extract_model,
    partitions_to_compute,
)
from vlray.extract.sink import OUTPUT_SCHEMA, EmbeddingSink

__all__ = [
    "OUTPUT_SCHEMA",
    "EmbedActor",
    "EmbeddingSink",
    "ModelResult",
    "config_hash",
    "decode_batch",
    "embed_batch_size",
    "extract_model",
    "partitions_to_compute",
    "tokenize_batch",
]

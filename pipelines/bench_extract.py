"""Extraction throughput benchmark for `ray submit` / `ray job submit` on a GPU node.

    ray job submit --working-dir . -- python pipelines/bench_extract.py --n 40000

(add ``--tokenizer DIR`` with a local tokenizer folder where the node cannot download one)

Prints, for a base-size vision and language model, the model-only rate, vlray's full
extraction and a naive per-layer loop, with the ratios (see vlray/bench/extract.py).
"""

import sys

from vlray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "extract", *sys.argv[1:]]))

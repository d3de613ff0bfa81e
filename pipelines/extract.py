"""Extraction job for `ray submit` / `ray job submit`.

    ray job submit --working-dir . -- python pipelines/extract.py \
        --config pipelines/configs/demo.yaml --lake s3://bucket/lake
    ray submit cluster.yaml pipelines/extract.py -- --config ... --lake ...

It joins the cluster in RAY_ADDRESS (set by both launchers) and runs `vlray extract`.
"""

import sys

from vlray.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))

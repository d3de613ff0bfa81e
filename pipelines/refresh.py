"""Scheduled reprocessing for `ray submit` / `ray job submit` / cron: computes only what is new
or stale (new models or datasets, changed model configs or items), then the alignment of the
model pairs whose inputs changed. A run with nothing new does nothing and says so.

    ray job submit --working-dir . -- python pipelines/refresh.py \
        --config pipelines/configs/demo.yaml --lake s3://bucket/lake
"""

import sys

from vlray.cli import main

if __name__ == "__main__":
    sys.exit(main(["refresh", *sys.argv[1:]]))

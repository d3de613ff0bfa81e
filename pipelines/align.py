"""Alignment job for `ray submit` / `ray job submit`: one Ray task per model pair.

    ray job submit --working-dir . -- python pipelines/align.py \
        --config pipelines/configs/demo.yaml --lake s3://bucket/lake

Without ``--config`` it aligns every (vision, language) model pair the lake holds (the flags
of `vlray align --help` apply).
"""

import sys

from vlray.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))

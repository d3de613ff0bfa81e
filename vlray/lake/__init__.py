"""The embeddings lake: Delta Lake tables on a local disk or an object store.

``tables`` says which tables there are; ``storage`` where the lake lives; ``delta`` how files
become visible (one transaction per job); ``lake`` what each step of vlray writes and reads;
``fingerprints`` when a dataset's embeddings go stale; ``upgrade`` converts a lake of the
plain-Parquet layout of vlray 0.1.
"""

from vlray.lake.delta import partition_path
from vlray.lake.fingerprints import ItemsFingerprint, items_fingerprint
from vlray.lake.lake import Lake, code_version, manifest_record, new_run_id
from vlray.lake.storage import LakeError, Storage
from vlray.lake.tables import MANIFEST_SCHEMA, TABLES, TableSpec

__all__ = [
    "MANIFEST_SCHEMA",
    "TABLES",
    "ItemsFingerprint",
    "Lake",
    "LakeError",
    "Storage",
    "TableSpec",
    "code_version",
    "items_fingerprint",
    "manifest_record",
    "new_run_id",
    "partition_path",
]

"""vlray: how far vision-only and language-only networks converge, at data-lake scale."""

__version__ = "0.4.0"


def open_lake(uri: str, as_of: int | str | None = None):
    """The lake at ``uri`` for reading arrays (``vlray.arrays.LakeArrays``): ``pairs(...)``,
    ``concepts(...)``, ``datasets()``, ``models(dataset)``."""
    from vlray.arrays import open_lake as _open

    return _open(uri, as_of)

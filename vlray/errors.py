"""The base of vlray's own errors: what its user can act on (a config field, an unknown model,
a lake that cannot be reached, a manifest line), as opposed to a bug.

``vlray`` (``cli.main``) prints a ``VlrayError`` as one line, ``vlray: error: MESSAGE`` (with
``--debug``, after its traceback); any other exception, a ``ValueError`` from inside numpy or
pyarrow included, keeps its traceback. Each error class also keeps the built-in base it had
(``ValueError``, ``RuntimeError``, ``LookupError``), so ``except ValueError`` still catches it.
"""

from __future__ import annotations


class VlrayError(Exception):
    """An error vlray raises for its user to act on; the message says what and where."""


class UsageError(VlrayError, ValueError):
    """The command line or its config asks for something that cannot be done (flags that do
    not go together, a value in the wrong form, a model or dataset the lake does not hold,
    models of one side only to align)."""


def one_line(err: BaseException, limit: int | None = None) -> str:
    """An exception's message as one line (its whitespace collapsed), or its type's name when
    it has none; cut to ``limit`` characters, ending in "...", when given."""
    text = " ".join(str(err).split()) or type(err).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text

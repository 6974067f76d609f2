"""How the tools' entry points end: a known error prints its one message, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..checkpoint import CheckpointError
from ..data import MNISTDataError
from .document import DocumentError

# Errors whose message already says what is wrong and what to do about it (a report folder
# without a metric or figure the document needs, e.g. after `--only` into a new folder).
KNOWN_ERRORS = (MNISTDataError, CheckpointError, DocumentError)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """main(argv)'s exit code; a known error prints 'error: <message>' and gives 2."""
    try:
        return main(argv)
    except KNOWN_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

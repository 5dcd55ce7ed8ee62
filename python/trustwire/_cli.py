"""The ``trustwire`` console script: the same command as the Rust binary, run in-process."""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

from . import _native


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Inside Python the core's logs go through `logging` (see trustwire._native); show them on
    # stderr the way the binary does.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = list(sys.argv if argv is None else ["trustwire", *argv])
    args[0] = "trustwire"
    return int(_native.cli_main(args))


if __name__ == "__main__":
    sys.exit(main())

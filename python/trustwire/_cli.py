"""The ``trustwire`` console script: the same command as the Rust binary, run in-process."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import _native


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv if argv is None else ["trustwire", *argv])
    args[0] = "trustwire"
    return int(_native.cli_main(args))


if __name__ == "__main__":
    sys.exit(main())

"""``python -m reactive``: the command line (see :mod:`reactive.cli`)."""

from __future__ import annotations

from reactive.cli import build_parser, main
from reactive.cli.demo import DemoError, load_example

__all__ = ["DemoError", "build_parser", "load_example", "main"]

if __name__ == "__main__":
    raise SystemExit(main())

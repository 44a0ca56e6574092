"""Thin entry point: the same as `microtune replay` (see `microtune replay --help`)."""

import sys

from adapters.cli import main

if __name__ == "__main__":
    sys.exit(main(["replay", *sys.argv[1:]]))

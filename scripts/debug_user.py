"""Thin entry point: the same as `microtune debug` (see `microtune debug --help`)."""

import sys

from adapters.cli import main

if __name__ == "__main__":
    sys.exit(main(["debug", *sys.argv[1:]]))

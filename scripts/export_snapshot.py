"""Thin entry point: the same as `microtune export` (see `microtune export --help`)."""

import sys

from adapters.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))

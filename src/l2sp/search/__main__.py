"""``python -m l2sp.search CONFIG --grid ...``: the ``l2sp search`` command on its own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from l2sp.errors import guarded
from l2sp.search.command import add_arguments, main


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="l2sp search", description="hyper-parameter search on the validation split")
    add_arguments(parser)
    return guarded(lambda: main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(run())

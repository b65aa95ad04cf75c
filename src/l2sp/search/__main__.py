"""``python -m l2sp.search CONFIG --grid ...``: the ``l2sp search`` command on its own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from l2sp.errors import L2SPError
from l2sp.search.command import add_arguments, main


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="l2sp search", description="hyper-parameter search on the validation split")
    add_arguments(parser)
    try:
        return main(parser.parse_args(argv))
    except L2SPError as exc:
        print(f"l2sp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("l2sp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())

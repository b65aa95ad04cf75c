"""``python -m l2sp ...`` (and ``torchrun -m l2sp ...``): the ``l2sp`` command."""

import sys

from l2sp.cli import main

if __name__ == "__main__":
    sys.exit(main())

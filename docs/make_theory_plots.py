"""Regenerate the figures of docs/analysis.md (Section 5.5 of the paper): `python docs/make_theory_plots.py`.

Writes docs/img/theory_linear_regression.png and docs/img/theory_convex_combination.png, and prints the
closed-form vs Monte-Carlo table. Deterministic (seeded); takes a few seconds on one CPU core.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from l2sp.analysis.theory_report import theory_report

IMG = Path(__file__).resolve().parent / "img"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = theory_report(tmp, draws=4000, seed=0)
        for key in ("linear_regression", "convex_combination"):
            target = IMG / f"theory_{key}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(paths[key], target)
            print(f"wrote {target} ({target.stat().st_size // 1024} KB)")
        print(Path(paths["md"]).read_text())


if __name__ == "__main__":
    main()

"""``python -m esosae.report GRID_DIR``: rewrite a grid's report (esosae.experiments.report)."""

import sys

from esosae.experiments.report import main

if __name__ == "__main__":
    sys.exit(main())

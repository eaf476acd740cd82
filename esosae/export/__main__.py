"""``python -m esosae.export RUN_DIR --format saelens OUT``: see ``esosae.export.cli``."""

import sys

from esosae.export.cli import main

sys.exit(main())

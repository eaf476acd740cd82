"""``python -m esosae.evals RUN_DIR [--only core,probing,curriculum] [...]``: see ``main``."""

import sys

from esosae.evals.cli import main

sys.exit(main())

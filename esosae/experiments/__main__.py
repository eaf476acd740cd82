"""``python -m esosae.experiments``: see esosae.experiments.runner."""

import sys

from esosae.experiments.runner import main

sys.exit(main())

"""Runs ``train.py``'s main (under torchrun, or alone) with the tiny Llama of lm_helpers
registered as ``--model tiny-llama``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lm_helpers import TINY, tiny_factory

from esosae.cli import main
from esosae.data import models

models.LOCAL_MODELS[TINY] = tiny_factory
sys.exit(main(sys.argv[1:]))

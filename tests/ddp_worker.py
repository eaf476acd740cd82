"""Runs ``train.py``'s main under torchrun and, for the test, also dumps each rank's weights
whenever the trainer checks that ranks are in sync (outside the run directory)."""

import sys
from pathlib import Path

import torch

from esosae import distributed
from esosae.cli import main

DUMP = Path(sys.argv[1])
_check = distributed.Dist.check_in_sync


def check_and_dump(self, model):
    _check(self, model)
    torch.save(model.state_dict(), DUMP / f"rank{self.rank}.pt")


distributed.Dist.check_in_sync = check_and_dump
sys.exit(main(sys.argv[2:]))

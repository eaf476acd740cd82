"""Runs ``train.py``'s main under torchrun and, for the test, also dumps each rank's weights
whenever the trainer checks that ranks are in sync (outside the run directory).
``ESOSAE_FAIL_AT=RANK:STEP`` makes that rank raise at that step."""

import os
import sys
from pathlib import Path

import torch

from esosae.training import distributed

from esosae.training import loop as train
from esosae.cli import main

DUMP = Path(sys.argv[1])
_check = distributed.Dist.check_in_sync


def check_and_dump(self, model):
    _check(self, model)
    torch.save(model.state_dict(), DUMP / f"rank{self.rank}.pt")


distributed.Dist.check_in_sync = check_and_dump

if os.environ.get("ESOSAE_FAIL_AT"):
    fail_rank, fail_step = map(int, os.environ["ESOSAE_FAIL_AT"].split(":"))
    _train_step = train.train_step

    def failing_step(model, opt, ops, x, cfg, step, *args, **kwargs):
        if step == fail_step and distributed.launch_rank() == fail_rank:
            raise RuntimeError(f"injected failure on rank {fail_rank} at step {step}")
        return _train_step(model, opt, ops, x, cfg, step, *args, **kwargs)

    train.train_step = failing_step
sys.exit(main(sys.argv[2:]))

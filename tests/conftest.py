"""Shared fixtures: every test starts from a fixed seed, and nothing leaks between tests."""

import os
import random

# The kernel tests run Triton's CPU interpreter, which must be on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield

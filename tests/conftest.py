"""Shared fixtures: every test starts from a fixed seed, and nothing leaks between tests."""

import os
import random

# The kernel tests run Triton's CPU interpreter, which must be on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import esosae  # noqa: F401  (before any test imports transformers: see esosae/__init__.py)
import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models and SAEs (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    one thread runs them faster, far faster when other jobs load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def poisoned():
    """Every kernel output buffer starts as NaN (or int32 min) instead of uninitialized memory,
    so a test sees any element a kernel failed to write (``pytestmark = usefixtures("poisoned")``)."""
    from esosae.kernels.utils import poisoned_outputs

    with poisoned_outputs():
        yield

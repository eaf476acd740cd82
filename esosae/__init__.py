"""esosae: sparse autoencoders on language-model activations, with the E-SOSAE method.

The Triton kernels live in the repository's top-level ``kernels/`` folder and install as
``esosae.kernels``. Run from the repository root (``python train.py``, ``python -m pytest``),
the root is on ``sys.path`` and that folder also answers to the bare name ``kernels``, which
belongs to Hugging Face's ``kernels`` distribution: transformers ≥ 5.25 depends on it and
imports it, and would find this folder instead. The finder below resolves the bare name on
``sys.path`` without the repository root, so it means the distribution wherever one is
installed; nothing in esosae imports the bare name.
"""

import importlib.machinery
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


class _HubKernelsFinder:
    """``import kernels`` → Hugging Face's distribution, never this repository's folder."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "kernels":
            return None
        elsewhere = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
        return importlib.machinery.PathFinder.find_spec(name, elsewhere)


if _HubKernelsFinder not in sys.meta_path:
    sys.meta_path.insert(0, _HubKernelsFinder)

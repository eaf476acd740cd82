"""Triton kernels for the SAE hot path, importable as ``esosae.kernels``."""

"""The training loop (loop), its optimizer (optim), data parallelism (distributed), and
telemetry and profiling (profiling)."""

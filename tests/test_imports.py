"""Imports point one way along the pipeline: the trainer never imports the evaluations."""

import subprocess
import sys


def test_the_trainer_does_not_import_the_evaluations():
    code = ("import sys, esosae.train, esosae.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('esosae.evals') or m == 'esosae.report'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"

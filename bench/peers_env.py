"""The sae-lens environment (bench/README.md "The peer race"): sae-lens pins TransformerLens < 4,
so it lives in its own virtual environment and runs as a subprocess. Used by the peer race
(bench/test_peers.py) and by the SAELens export check (tests/test_export.py)."""

import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS_PYTHON = Path(os.environ.get("ESOSAE_PEERS_PYTHON", REPO / ".venv-peers" / "bin" / "python"))


def peer_problem() -> str | None:
    """Why the sae-lens environment cannot be used here, or None."""
    if not PEERS_PYTHON.exists():
        return (f"no sae-lens environment ({PEERS_PYTHON} is missing; set ESOSAE_PEERS_PYTHON or create it "
                "as bench/README.md 'The peer race' says)")
    r = subprocess.run([str(PEERS_PYTHON), "-P", "-c", "import sae_lens"], capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"sae_lens does not import in {PEERS_PYTHON}: {last}"
    return None

"""Train a sparse autoencoder: ``python train.py --schedule exp`` (see README.md)."""

import sys

from esosae.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

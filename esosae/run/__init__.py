"""The run directory and everything written to disk whole: its layout and file names
(layout), atomic writes and Ctrl-C handling (atomic), checksummed checkpoints (checkpoint)
and checksummed cache manifests (manifest)."""

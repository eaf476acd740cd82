"""Export a trained run's SAE to other libraries' formats (``python -m esosae.export``)."""

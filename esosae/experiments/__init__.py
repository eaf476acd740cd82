"""The comparison grids: variants and budgets (grid), L0 calibration (calibrate), the resumable
runner (runner, ``python -m esosae.experiments``) and the report (report, ``python -m esosae.report``)."""

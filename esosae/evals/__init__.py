"""Evaluations of trained SAEs."""

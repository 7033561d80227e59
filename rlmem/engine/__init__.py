"""Rollout engines. ``reference`` is the torch engine (ground truth, CPU default)."""

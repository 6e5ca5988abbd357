"""Baseline editors that `evaluate` compares ReasonEdit against (GRACE)."""

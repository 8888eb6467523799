"""Sweeps: a validated recipe runs every stage, resumably, with a report."""

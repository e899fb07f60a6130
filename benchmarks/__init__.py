"""Benchmarks and storms: scripts run as ``python benchmarks/<name>.py``; tests import their constants."""

"""Reproducible benchmarks of tether and the peers it runs beside (issue 4)."""

"""Fuzz targets for the sans-I/O core: every input either parses or fails in a documented way."""

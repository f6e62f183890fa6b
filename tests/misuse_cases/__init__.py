"""Misuse cases for tests/test_misuse.py, one module per area, each exporting ``CASES``."""

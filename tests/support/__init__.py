"""Helpers shared by the tests (plain code, no fixtures: conftest.py wraps these in fixtures).

`tests/` is on sys.path through `pythonpath` in pyproject.toml's pytest options, so test
modules and conftest.py import these as `support.<module>`.
"""

"""asyncpool benchmarks: standalone scripts, not collected by pytest.

Run them all with ``python benchmarks/run.py`` (see README.md here).
"""

"""Reproducible performance benchmarks (issue 5). Run them all with ``python -m benchmarks.run_all``."""

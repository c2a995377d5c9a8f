"""Benchmarks: our artifact against the systems a user would otherwise pick (``dlrm-bench``)."""

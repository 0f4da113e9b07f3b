"""Benchmarks: graphpeft side by side with its anchors (``python -m benchmarks``)."""

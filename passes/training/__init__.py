"""Passes over training-step graphs: gradient-flow check, the backward report, and the
gradient all-reduce of data-parallel steps."""

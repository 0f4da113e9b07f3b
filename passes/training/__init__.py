"""Passes over training-step graphs: gradient-flow check and the backward report."""

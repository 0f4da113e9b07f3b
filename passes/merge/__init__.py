"""Merge passes: fold adapters into base weights; put sliced weights back together."""

"""Memory passes over training-step graphs: update reordering, peak-memory scheduling,
rematerialization under a budget, the static memory planner and its measurement."""

from . import measure_memory, rematerialize, schedule_memory  # noqa: F401 - register the passes

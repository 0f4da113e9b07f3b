"""Memory passes over training-step graphs: update reordering, the static memory planner."""

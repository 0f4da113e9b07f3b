"""Placeholder: this method module is being written (issue 6)."""


class RandLoRA:  # replaced by the method's plan rule
    pass

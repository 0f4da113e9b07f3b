"""Placeholder: this method module is being written (issue 6)."""


class SoRA:  # replaced by the method's plan rule
    pass

"""Placeholder: this method module is being written (issue 6)."""


class NOLA:  # replaced by the method's plan rule
    pass

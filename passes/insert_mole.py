"""Placeholder: this method module is being written (issue 6)."""


class MoLE:  # replaced by the method's plan rule
    pass

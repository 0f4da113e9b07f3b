"""Placeholder: this method module is being written (issue 6)."""


class SVFit:  # replaced by the method's plan rule
    pass

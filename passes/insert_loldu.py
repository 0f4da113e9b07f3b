"""Placeholder: this method module is being written (issue 6)."""


class LoLDU:  # replaced by the method's plan rule
    pass

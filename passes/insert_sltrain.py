"""Placeholder: this method module is being written (issue 6)."""


class SLTrain:  # replaced by the method's plan rule
    pass

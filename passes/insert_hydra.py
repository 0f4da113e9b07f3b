"""Placeholder: this method module is being written (issue 6)."""


class Hydra:  # replaced by the method's plan rule
    pass

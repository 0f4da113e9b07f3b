"""Placeholder: this method module is being written (issue 6)."""


class LoRAXS:  # replaced by the method's plan rule
    pass

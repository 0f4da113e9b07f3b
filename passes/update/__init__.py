"""Sparse updates of the model's own parameters (PockEngine style): the ``gp.Update`` rule,
row slicing of a weight into a trainable slice and a frozen rest, the gradient probe, freezing."""

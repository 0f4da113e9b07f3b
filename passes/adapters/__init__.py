"""Adapter methods: one module per method (``insert_<method>.py``: plan rule, rewrite, pass,
``AdapterMethod``), sharing the layer-matching pieces of ``layer_rewrite.py``. ``insert_lora``
is the example to copy."""

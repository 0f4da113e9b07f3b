"""Generic graph clean-up: dead code, common subexpressions, algebraic simplification."""

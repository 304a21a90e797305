"""Evaluation of MODUS: the paper's metrics (``metrics/``), each a function on arrays."""

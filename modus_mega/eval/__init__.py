"""Evaluation of MODUS: the paper's metrics (``metrics/``), the benchmark and the ablations.

``python -m modus_mega.eval`` scores a checkpoint on every source -> target direction of a suite;
``python -m modus_mega.eval.ablations NAME`` runs one of the paper's ablations. Modules, one job
each: ``suites`` (scenes with exact ground truth), ``directions`` (the any-to-any grid),
``scoring`` (decode + metric per target modality), ``baselines`` (trivial predictions),
``runner`` (generate and score), ``report`` (results.json, markdown, heatmap and plots),
``loading`` and ``options`` (checkpoint and command-line seams).
"""

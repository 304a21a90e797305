"""Layout planner: memory and step-time models of MODUS training on N GPUs.

``python -m modus_mega.plan --config configs/7b.json --gpus 256 --out best.json`` ranks
layouts; ``docs/SCALING.md`` records its choices. Modules, in dependency order:
``calibration`` (hardware figures from ``bench/calibration/*.json``), ``shapes``
(where parameters live under tp/pp), ``workload`` (what a micro-batch holds),
``layout``, ``memory``, ``timing``, ``search`` (enumerate, predict, rank), ``report``.
"""

"""Measurements of a model: perplexity, STS-B, fidelity, size and speed (``metrics``, which calibration, the
planner and the heal losses use too), the registered tasks of ``layerfold eval`` (``tasks``) and local
lm-evaluation-harness tasks (``lm_eval_tasks``)."""

"""Downstream evaluation with lm-evaluation-harness: the report's benchmarks and the shipped local tasks
(benchmarks.py, tasks/), our models as the harness's HF wrapper sees them (model_adapter.py), loading what
`fuxi eval --checkpoint` points at (model_source.py), running the harness (harness.py), a run's checkpoints over
tokens seen (trajectory.py) and evaluation during training (in_loop.py). lm-eval is imported only when an
evaluation runs (`pip install -e .[eval]`)."""

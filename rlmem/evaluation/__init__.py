"""``rlmem eval``: accuracy against memory for NGC and the eviction baselines on any model and task.

tasks (problems, prompts, grading) -> runner (every method × ε × problem, resumable) -> store
(the run directory) -> results (pass@k, peak-KV reduction, results.json / results.md) -> plots.
"""

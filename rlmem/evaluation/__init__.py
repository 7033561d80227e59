"""The one evaluation pipeline: accuracy against memory for NGC and the eviction baselines.

tasks (problems, prompt text, decoding, grading) -> pipeline (an EvalPlan sampled job by job
through an executor: a local engine for ``rlmem eval``, the rollout workers in training) -> store
(finished cells: in memory, or a resumable run directory) -> results (pass@k, peak-KV reduction:
the rows of results.json and eval.jsonl alike). ``runner`` is the ``rlmem eval`` command's side;
the figures are ``rlmem.figures``.
"""

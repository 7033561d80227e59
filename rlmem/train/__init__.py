"""Training orchestration: the driver's step loop, Ray actors and their placement, rollout fan-out,
weight sync and the eviction-rate schedule. Run-directory concerns live in :mod:`rlmem.run`, the
update in :mod:`rlmem.learner`.

Modules are imported explicitly (``from rlmem.train.driver import run_training``) so that importing
one part never drags in Ray, DeepSpeed or W&B.
"""

"""Training: config schema, curriculum, logging, checkpoints, and the Ray driver.

Modules are imported explicitly (``from rlmem.train.config import load_config``) so that importing
one part never drags in Ray, DeepSpeed or W&B.
"""

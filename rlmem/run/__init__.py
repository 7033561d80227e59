"""The run: its typed config, its directory (lock, plan, records), checkpoints, logging and the
checks made before anything starts. Nothing here imports Ray, DeepSpeed or W&B at import time."""

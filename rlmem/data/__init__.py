"""Tasks and data: the Countdown generator, the dataset registry and loaders, prompt templates."""

from rlmem.data.countdown import generate_countdown, reachable, solve
from rlmem.data.datasets import (DATASETS, DatasetError, DatasetSpec, dataset_names, find_leaks, load_examples,
                                 read_rows, register_dataset)
from rlmem.data.templates import build_prompt, interoception_tag

__all__ = ["load_examples", "generate_countdown", "solve", "reachable", "build_prompt", "interoception_tag",
           "DATASETS", "DatasetError", "DatasetSpec", "dataset_names", "find_leaks", "read_rows", "register_dataset"]

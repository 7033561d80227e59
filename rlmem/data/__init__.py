"""Tasks and data: the Countdown generator, dataset loaders, prompt templates."""

from rlmem.data.countdown import generate_countdown, reachable, solve
from rlmem.data.datasets import DATASETS, DatasetError, find_leaks, load_examples, read_rows
from rlmem.data.templates import build_prompt, interoception_tag

__all__ = ["load_examples", "generate_countdown", "solve", "reachable", "build_prompt", "interoception_tag",
           "DATASETS", "DatasetError", "find_leaks", "read_rows"]

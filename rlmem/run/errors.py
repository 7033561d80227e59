"""The one error type of a run that cannot continue; its text is printed as one line by ``rlmem train``."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run that cannot continue (dead worker, unusable run directory or checkpoint); says what to do next.

    ``exit_code`` is 2 for problems with the user's input (config, data, run directory, checkpoint
    chosen), 1 for a run that failed while running."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(e: BaseException) -> str:
    """The first line of an exception's text (Ray errors carry pages of remote traceback)."""
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__

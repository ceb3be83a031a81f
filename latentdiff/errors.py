"""Errors that reach the user as one sentence."""


class ModelError(ValueError):
    """A model path that cannot be loaded, or a model that produced NaN / blank output."""


class TrainingError(RuntimeError):
    """A training run that cannot go on (the loss or the weights became NaN/inf, a process failed); exit 1."""


class UsageError(ValueError):
    """Bad input to a command: reported as one sentence, exit code 2, nothing written."""


def first_line(error: BaseException) -> str:
    """A library's error, cut to its first line (or its type when it says nothing) to fit in one sentence."""
    return (str(error).strip().splitlines() or [error.__class__.__name__])[0]

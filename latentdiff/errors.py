"""Errors that reach the user as one sentence."""


class ModelError(ValueError):
    """A model path that cannot be loaded, or a model that produced NaN / blank output."""


class TrainingError(RuntimeError):
    """A training run that cannot go on (the loss or the weights became NaN/inf, a process failed); exit 1."""


class UsageError(ValueError):
    """Bad input to a command: reported as one sentence, exit code 2, nothing written."""

"""Errors that reach the user as one sentence."""


class ModelError(ValueError):
    """A model path that cannot be loaded, or a model that produced NaN / blank output."""

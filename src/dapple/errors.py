"""Exceptions that Dapple raises on purpose. Each message says what was wrong and what is allowed."""


class DappleWarning(UserWarning):
    """Base of the warnings Dapple gives on purpose: something was done differently from what was asked."""


class DappleError(Exception):
    """Base of every error Dapple raises deliberately (interfaces turn these into clean messages)."""


class InvalidRequestError(DappleError, ValueError):
    """A request field is out of bounds or malformed."""


class UnknownSamplerError(DappleError, ValueError):
    """A sampler or schedule-type name that the registry does not know."""


class ModelLoadError(DappleError):
    """A model folder is missing, incomplete or unreadable."""


class PickleRefusedError(ModelLoadError):
    """Weights exist only as pickle files, and the caller did not opt in to loading them."""


class GenerationCancelled(DappleError):
    """A generation was stopped through its cancel token."""

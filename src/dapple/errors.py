"""Exceptions that Dapple raises on purpose. Each message says what was wrong and what is allowed."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: str, choices: Iterable[object], cutoff: float = 0.6) -> str | None:
    """The choice nearest to a misspelt name (difflib's ratio >= cutoff, ignoring case), or None."""
    by_fold = {str(choice).casefold(): str(choice) for choice in choices}
    close = difflib.get_close_matches(str(name).strip().casefold(), list(by_fold), n=1, cutoff=cutoff)
    return by_fold[close[0]] if close else None


def did_you_mean(name: str, choices: Iterable[object], cutoff: float = 0.6) -> str:
    """"; did you mean 'Euler a'?" (to end a message) when a close choice exists, else ""."""
    nearest = closest(name, choices, cutoff)
    return f"; did you mean {nearest!r}?" if nearest else ""


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


class NotEnoughMemoryError(DappleError):
    """An allocation failed (GPU or CPU memory); the message names the memory options to use."""

"""The models a server offers: its default model, loaded at start, and the checkpoints of a models folder,
loaded when a job names one. One folder model is kept loaded beside the default; naming another replaces it
(between jobs: the worker runs one job at a time), so memory stays at two models at most."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dapple.errors import DappleError
from dapple.models.library import ModelFolders


class UnknownModelError(DappleError, LookupError):
    """A job named a model the server does not have."""

    def __init__(self, message: str, valid: list[str]) -> None:
        super().__init__(message)
        self.valid = valid


class ModelPool:
    def __init__(self, default: Callable[[], Any], default_name: str = "model",
                 folders: ModelFolders | None = None, load: Callable[[Path], Any] | None = None) -> None:
        self._default_factory = default
        self.default_name = default_name
        self._folders = folders
        self._load = load
        self._lock = threading.Lock()
        self._default: Any = None
        self._other: tuple[str, Any] | None = None

    def names(self) -> list[str]:
        """Every model a job may name: the default first, then the folder's checkpoints."""
        names = [self.default_name]
        if self._folders is not None:
            names += [entry.name for entry in self._folders.entries("checkpoints") if entry.name != self.default_name]
        return names

    def path(self, name: str) -> Path | None:
        """Where a folder model lives (None for the default, which the server was started with)."""
        self.check(name)
        if name == self.default_name or self._folders is None:
            return None
        return self._folders.find("checkpoints", name)

    def loaded(self) -> list[str]:
        names = [self.default_name] if self._default is not None else []
        return names + ([self._other[0]] if self._other is not None else [])

    def check(self, name: str | None) -> None:
        """Refuse a model name the server cannot load (before the job is accepted)."""
        if name is not None and name not in self.names():
            raise UnknownModelError(f"unknown model {name!r}; available: {', '.join(self.names())}", self.names())

    def get(self, name: str | None) -> Any:
        """The pipeline for `name` (None: the default), loading it if needed."""
        self.check(name)
        with self._lock:
            if name is None or name == self.default_name:
                if self._default is None:
                    self._default = self._default_factory()
                return self._default
            if self._other is None or self._other[0] != name:
                self._other = None  # let the previous one go before loading the next
                assert self._folders is not None and self._load is not None
                self._other = (name, self._load(self._folders.find("checkpoints", name)))
            return self._other[1]

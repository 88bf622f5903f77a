"""What the registry refuses, as exceptions that name the file, field or version at fault.

Every refusal happens before the registry changes (no version folder, no commit, no tag), or
undoes what it had begun; the CLI maps them to a one-line message and a non-zero exit.
"""

from __future__ import annotations

from typing import Any

from components.errors import InputError


class RegistryError(InputError, ValueError):
    """A registry operation that cannot be done as asked; the registry is unchanged."""


class ArtifactRefused(RegistryError):
    """A model folder or archive that may not enter the registry (pickle, path traversal, ...)."""


class GateError(RegistryError):
    """A candidate that does not pass the promotion gate; `report` holds every comparison."""

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report


class RollbackError(RegistryError):
    """A rollback with nowhere to go back to."""

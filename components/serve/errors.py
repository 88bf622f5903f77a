"""What the serving steps raise: one base class, so the CLI turns any of them into one line and exit 1."""

from components.errors import InputError


class ServeError(InputError, RuntimeError):
    """A serving step that cannot go on: the server, a check, an export."""


class ExportError(ServeError, ValueError):
    """A model repository or version that export refuses to write."""

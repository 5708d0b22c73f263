"""The one error of the launcher: what it raises for anything an operator must fix."""

from __future__ import annotations


class LaunchError(RuntimeError):
    """A process did not start, did not become ready in time, or a command failed."""

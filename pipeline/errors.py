"""Errors a user can meet, each rendered as one line naming the file, the key and the fix.

Raised anywhere in the pipeline; `pipeline.__main__` prints them and exits with code 2. Nothing runs at import.
"""
from __future__ import annotations


class PipelineError(Exception):
    """A problem with the user's input (recipe, data, flags) rather than a bug: exit code 2, one line."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None, fix: str | None = None):
        self.message, self.file, self.line, self.key, self.fix = message, file, line, key, fix
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        key = f"{self.key}: " if self.key else ""
        fix = f" (fix: {self.fix})" if self.fix else ""
        return f"{where}{key}{self.message}{fix}"


class RecipeError(PipelineError):
    """The recipe is malformed: schema, references, overrides."""


class DataError(PipelineError):
    """A dataset is missing, has the wrong columns or bad rows."""


class TrainingError(PipelineError):
    """Training diverged (NaN/inf) or could not continue; the last good checkpoint is kept."""

    exit_code = 1


class SecurityError(PipelineError):
    """A request that would be unsafe: pickle weights, remote code, writing outside the output folder."""

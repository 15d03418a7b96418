"""Errors a user can fix. The CLI prints them as one line and exits with their code, no traceback."""


class KeelError(Exception):
    """A problem with the user's input or environment: one line that names it and the fix."""

    exit_code = 2


class RecipeError(KeelError):
    """A recipe that does not parse or does not validate."""


class DataError(KeelError):
    """Data that cannot be read or does not fit the recipe."""


class CheckpointError(KeelError):
    """A checkpoint or model folder that is missing, incomplete or corrupt."""


class GateError(KeelError):
    """A quality gate in the recipe failed (for CI pipelines)."""

    exit_code = 3

"""The one exception type that turns into a one-line user error (exit code 2)."""


class InputError(Exception):
    """Bad or missing input. The message must name the file, the problem and the fix."""

"""The exceptions that end a command: InputError (a one-line user error, exit code 2) and Stopped
(a rank of a distributed run that stops because another rank failed)."""


class InputError(Exception):
    """Bad or missing input. The message must name the file, the problem and the fix."""


class Stopped(Exception):
    """This rank of a distributed run stops because a rank failed (utils.core.distributed).

    exit_code: the failure's exit code; message: the `error:` line to print (rank 0 only), or None."""

    def __init__(self, exit_code: int, message: str | None = None):
        super().__init__(message or f"stopped (exit code {exit_code})")
        self.exit_code = exit_code
        self.message = message

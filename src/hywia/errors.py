"""The exceptions users see. A `HywiaError` message is one line that names the fix; `Interrupted` is a signal that
ended the run, its message saying what was kept (docs/errors.md)."""


class HywiaError(Exception):
    """One line, always: a user's value echoed in the message (a path or name with a newline in it) is escaped, so
    the message stays the single line the CLI prints."""

    def __init__(self, message: str = ""):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP ended the run. A KeyboardInterrupt, so every `finally` and every cleanup that
    already handles Ctrl-C (temporary folders, checkpoints) handles `kill` and `timeout` the same way."""

    def __init__(self, signal_name: str = "SIGINT", kept: str | None = None):
        super().__init__(signal_name, kept)
        self.signal_name = signal_name
        self.kept = kept  # what the run leaves behind that a rerun can use ("checkpoints up to step 50 in ...")

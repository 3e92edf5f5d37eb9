"""The exceptions users see. A `HywiaError` message is one line that names the fix; `Interrupted` is a signal that
ended the run, its message saying what was kept (docs/errors.md)."""


class HywiaError(Exception):
    pass


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP ended the run. A KeyboardInterrupt, so every `finally` and every cleanup that
    already handles Ctrl-C (temporary folders, checkpoints) handles `kill` and `timeout` the same way."""

    def __init__(self, signal_name: str = "SIGINT", kept: str | None = None):
        super().__init__(signal_name, kept)
        self.signal_name = signal_name
        self.kept = kept  # what the run leaves behind that a rerun can use ("checkpoints up to step 50 in ...")

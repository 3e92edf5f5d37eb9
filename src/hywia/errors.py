"""The one exception type users see: its message is a single line that names the fix."""


class HywiaError(Exception):
    pass

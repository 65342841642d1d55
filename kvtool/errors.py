"""The one exception type kvtool raises for bad input; the CLI turns it into a one-line `Error: ...`."""


class KvtoolError(Exception):
    """A user-facing error: bad input, a missing file, a profile for another model, ...

    The message is one line, written for the person at the terminal (no traceback is shown for it).
    """

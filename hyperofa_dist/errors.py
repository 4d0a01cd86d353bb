"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class HyperofaError(Exception):
    """A user-facing failure: bad input, bad config, a missing file.

    The message must be one line that names the file or key and the problem; the CLI prints it
    without a traceback. Anything else that escapes is a bug and keeps its traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

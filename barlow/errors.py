"""One exception type for everything a user can fix, so the CLI prints it as one line."""


class BadInput(Exception):
    """Input the user can fix. The message names the input and says what to do."""

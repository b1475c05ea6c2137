"""The one exception type that reaches the user as a single line (see `engine.run.main`)."""


class UserError(Exception):
    """Bad input from the user: a missing path, an unknown name, weights that do not fit.

    The CLI prints `error: <message>` and exits with status 2; the message must say what was
    wrong, what was expected and, where it helps, what to do.
    """

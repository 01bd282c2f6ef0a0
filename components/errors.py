"""The one exception type the CLI turns into a short message instead of a traceback."""


class UserError(Exception):
    """Bad input or an unmet precondition the user can fix; the message says how."""

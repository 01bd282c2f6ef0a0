"""The exceptions the CLI shows as a short message instead of a traceback."""


class UserError(Exception):
    """Bad input or an unmet precondition the user can fix; the message says how."""


class Reported(Exception):
    """A failure already logged where it happened (a sweep's factor): it ends its Prefect run
    Failed, and its traceback would add nothing to the logged message."""

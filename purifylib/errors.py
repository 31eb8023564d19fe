"""The one exception type users see.

Every error that is the caller's fault (a missing directory, a malformed record, an unknown
attack) is raised as :class:`PurifyError` with a one-line message saying what is wrong and where.
The command line prints that line and exits non-zero; a traceback appears only with ``--debug``.
"""


class PurifyError(Exception):
    """A user-facing error: the message is one line naming the file, record or field at fault."""

"""The one exception type users see.

Every error that is the caller's fault (a missing directory, a malformed record, an unknown
attack) is raised as :class:`PurifyError` with a one-line message saying what is wrong and where.
The command line prints that line and exits non-zero; a traceback appears only with ``--debug``.
"""


from contextlib import contextmanager


class PurifyError(Exception):
    """A user-facing error: the message is one line naming the file, record or field at fault."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message ('' when it has none), for one-line errors."""
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")


@contextmanager
def reading(path, what: str, missing: str | None = None):
    """Turn the file system's errors while reading ``path`` (a ``what``) into one-line :class:`PurifyError`\ s."""
    try:
        yield
    except FileNotFoundError:
        raise PurifyError(f"{path}: {missing or 'no such ' + what}") from None
    except IsADirectoryError:
        raise PurifyError(f"{path}: is a directory, expected a {what}") from None
    except NotADirectoryError:
        raise PurifyError(f"{path}: not a directory") from None
    except OSError as exc:
        raise PurifyError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None

"""The one exception type for user errors.

User errors (bad paths, wrong layouts, corrupt files, bad config keys) raise
:class:`CovidXrayError`; the CLI prints its message on one line and exits with
code 2. Programming errors keep their normal traceback.
"""

from __future__ import annotations


class CovidXrayError(Exception):
    """A problem the user can fix. ``str(err)`` says what is wrong and how to fix it.

    Args:
        message: what is wrong, naming the file/key/value concerned.
        hint: optional fix, appended as ``" (fix: ...)"``-style text.
    """

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}. {hint}")

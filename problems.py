"""What the site refuses to do, said for the person who asked.

Core modules raise these without knowing about HTTP; the web layer (views.base) answers
each kind with its status code: a page for a browser, ``{"error": ...}`` on the API.
"""

from __future__ import annotations


class Problem(Exception):
    """A request the site cannot carry out as asked: bad input (400 unless a subclass
    says otherwise). The message says what is wrong and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(Problem):
    """What was asked for does not exist (404)."""


class NotAllowed(Problem):
    """The person asking may not do this (403)."""


class Conflict(Problem):
    """It clashes with something that already exists (409)."""


class FieldProblems(Problem):
    """Bad form fields: ``errors`` maps each field to what is wrong with it (400)."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(errors.values()))
        self.errors = errors

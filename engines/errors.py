"""Errors that reach a user: one line naming the file and what was expected."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the CLI prints it as one line and exits non-zero."""


class ImageError(UserError):
    """An image file or payload that cannot be read as the model expects."""


class BundleError(UserError):
    """A model bundle that is missing, incomplete, tampered with or incompatible."""


class InspectError(Exception):
    """One image could not be inspected; it becomes a reject with ``reason`` and ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

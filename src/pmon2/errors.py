"""Errors that reach a user as one line, never as a traceback."""

from __future__ import annotations


class PmonError(Exception):
    """An error with a message fit for a user. `code` is a stable machine-readable tag."""

    code = "error"
    http_status = 400

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class NotFound(PmonError):
    code = "not_found"
    http_status = 404


class Conflict(PmonError):
    code = "conflict"
    http_status = 409


class BadRequest(PmonError):
    code = "bad_request"
    http_status = 400


class SpawnError(PmonError):
    code = "spawn_failed"
    http_status = 422


class DaemonUnreachable(PmonError):
    code = "daemon_unreachable"


class StoreError(PmonError):
    code = "store"
    http_status = 500

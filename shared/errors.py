"""One error hierarchy with stable codes, shared by the coordinator, the worker and the trainer.

Services raise these; the coordinator maps them to HTTP in exactly one place
(`coordinator/api/errors.py`) using OpenAI's error envelope.
"""

from __future__ import annotations


class TunegridError(Exception):
    """Base of every domain error: a message for humans, a code for machines."""

    http_status: int = 400
    type: str = "invalid_request_error"
    code: str = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(TunegridError):
    """The request is well-formed HTTP but asks for something invalid."""


class InvalidFile(TunegridError):
    """An uploaded dataset failed validation; the message names the line and the reason."""

    code = "invalid_file"


class AuthenticationFailed(TunegridError):
    http_status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class InsufficientQuota(TunegridError):
    """The customer's balance cannot cover what the request would hold or charge: OpenAI's answer to an account
    out of credit (429, `insufficient_quota`), which its clients already handle."""

    http_status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class BadGateway(TunegridError):
    """A service we depend on (Stripe) failed or did not answer in time; nothing was lost, retry later."""

    http_status = 502
    type = "server_error"
    code = "upstream_error"


class RateLimited(TunegridError):
    """Too many requests with one key: wait `retry_after_s` (sent as Retry-After) and try again."""

    http_status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UploadRejected(TunegridError):
    """A worker's upload (a checkpoint) failed the coordinator's checks: nothing was stored, and it counts against
    the worker. The message names the check."""

    http_status = 422
    code = "checkpoint_rejected"


class PermissionDenied(TunegridError):
    http_status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(TunegridError):
    http_status = 404
    code = "not_found"


class Conflict(TunegridError):
    """The resource is in a state that does not allow the operation."""

    http_status = 409
    code = "invalid_state"


class PayloadTooLarge(TunegridError):
    http_status = 413
    code = "payload_too_large"


class ServerError(TunegridError):
    http_status = 500
    type = "server_error"
    code = "internal_error"


class LeaseLost(Conflict):
    """A worker called with a fencing token that is no longer the job's current one: stop that container."""

    code = "lease_lost"


class InsufficientStorage(TunegridError):
    """The coordinator's disk is full: nothing of the upload is kept; retry later."""

    http_status = 507
    type = "server_error"
    code = "insufficient_storage"

"""The project's error tree. Every error carries what the HTTP layer needs to answer
with an OpenAI-shaped body: a status, an OpenAI error ``type``, a ``code`` and the
offending ``param`` where there is one."""

from __future__ import annotations


class DynamoBusError(Exception):
    """Base of every error this package raises on purpose."""

    status: int = 500
    type: str = "internal_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_openai(self) -> dict[str, object]:
        """The body OpenAI's API answers with, so OpenAI clients raise the right error."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class InvalidRequest(DynamoBusError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ModelNotFound(DynamoBusError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PromptTooLong(DynamoBusError):
    status = 413
    type = "invalid_request_error"
    code = "context_length_exceeded"


class Overloaded(DynamoBusError):
    """No capacity now: retry later (429 when the caller should back off, 503 when
    nothing can serve the request at all)."""

    status = 503
    type = "service_unavailable"
    code = "overloaded"


class NoWorker(Overloaded):
    code = "no_worker"


class RequestTimeout(DynamoBusError):
    status = 504
    type = "timeout"
    code = "timeout"


class ProtocolError(DynamoBusError):
    """A message on the bus could not be decoded or has a newer schema."""

    code = "protocol_error"


class ConfigError(DynamoBusError):
    """A setting is missing or invalid; the message names the flag and the env var."""

    code = "config_error"


class ModelUnavailable(ConfigError):
    """The model directory cannot be found or fetched."""

    code = "model_unavailable"


# Errors that arrive inside an SSE stream carry no HTTP status: recover it from the code.
_CODE_STATUS = {"no_worker": 503, "overloaded": 503, "worker_lost": 503,
                "worker_shutdown": 503, "shutdown": 503, "timeout": 504,
                "too_many_requests": 429, "model_not_found": 404,
                "context_length_exceeded": 400, "invalid_value": 400,
                "request_too_large": 413}


def from_status(status: int | None, message: str, *, code: str | None = None,
                param: str | None = None) -> DynamoBusError:
    """Rebuild a typed error from a status, or from the code when the status is not
    known (used by clients reading an error body)."""
    if status is None:
        status = _CODE_STATUS.get(code or "", 500)
    cls: type[DynamoBusError] = {400: InvalidRequest, 404: ModelNotFound, 413: PromptTooLong,
                                 429: Overloaded, 503: Overloaded, 504: RequestTimeout
                                 }.get(status, DynamoBusError)
    return cls(message, code=code, param=param, status=status)

"""Error types -> HTTP status, and the two API dialects' error bodies (a table, never message parsing)."""

from __future__ import annotations

from typing import Any

from edgelm import errors

HTTP_STATUS: list[tuple[type[BaseException], int]] = [
    (errors.UnknownModelNameError, 404),
    (errors.ContextLengthExceededError, 400),
    (errors.InvalidParameterError, 400),
    (errors.NoChatTemplateError, 400),  # chat with a model that has no chat template; its completions still work
    (errors.UnsupportedModelError, 400),
    (errors.WorkerUnreachableError, 503),  # an RPC worker is down: the service is unavailable until it is back
    (errors.ModelNotFoundError, 500),  # a configured model whose file vanished: the server's fault
    (errors.BackendNotInstalledError, 500),
    (errors.EdgelmError, 500),
]


class RequestError(Exception):
    """A bad request the adapters detect themselves (malformed JSON, body too large, missing field...)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def status_for(exc: BaseException) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    for cls, status in HTTP_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def openai_error(exc: BaseException) -> dict[str, Any]:
    status = status_for(exc)
    if isinstance(exc, RequestError):
        message, param, code = exc.message, exc.param, exc.code
    elif isinstance(exc, errors.EdgelmError):
        message, param, code = str(exc), getattr(exc, "parameter", None), exc.code
    else:
        message, param, code = "Internal server error.", None, "internal_error"
    kind = ("invalid_request_error" if status in (400, 404, 413, 422) else
            "authentication_error" if status == 401 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def ollama_error(exc: BaseException) -> dict[str, Any]:
    return {"error": openai_error(exc)["error"]["message"]}

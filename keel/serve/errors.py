"""Every error the server answers is OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    504: "timeout_error",
}


class ServeError(Exception):
    """An error with its HTTP status, for the envelope."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def envelope(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(envelope(status, message, param, code), status_code=status, headers=headers)


def check_model(state, route: str, model: str | None) -> None:
    """404 for another model's name; 400 when the loaded model (``state.engine``) cannot serve this route."""
    engine = state.engine
    if model is not None and model != engine.model_id:
        raise ServeError(
            404,
            f"model '{model}' is not served here; this server serves '{engine.model_id}' (see /v1/models)",
            "model",
            "model_not_found",
        )
    if route not in engine.routes:
        serves = ", ".join(f"/v1/{r}".replace("/v1/chat", "/v1/chat/completions") for r in engine.routes)
        raise ServeError(
            400,
            f"'{engine.model_id}' is a {engine.kind} model and cannot serve /v1/{route}; it serves {serves}",
            "model",
            "unsupported_route",
        )


def _validation(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """The first problem as (message, param, code); ``param`` is the dotted path inside the body."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None, "invalid_value"
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    # Union members add their type name to the path ("prompt.str"); keep the field path only.
    loc = [p for p in loc if p not in ("str", "list[str]", "function-after[...]") and not p.startswith("list[")]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "the body is not valid JSON; send a JSON object", None, "invalid_json"
    if kind == "extra_forbidden":
        return f"unknown field '{param}'; remove it (see /docs for the accepted fields)", param, "unknown_field"
    if kind == "missing" and param is None:
        return "the body is empty (or null); send a JSON object (see /docs)", None, "missing_body"
    if kind == "missing":
        return f"'{param}' is required", param, "missing_field"
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "the body must be a JSON object", None, "invalid_type"
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{param or 'body'}: {msg}", param, "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param, code = _validation(exc)
        return error_response(400, message, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # not UTF-8
            return error_response(400, "the body is not valid JSON in UTF-8; send a JSON object", None, "invalid_json")
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # The client hears the exception's type only; the log gets the traceback too (never the request body).
        logger.error("unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
        return error_response(500, f"internal error ({type(exc).__name__})", None, "internal_error")

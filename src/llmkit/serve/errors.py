"""Errors in OpenAI's shape ({"error": {"message", "type", "param", "code"}}) and the handlers that make every
failure one: validation errors, HTTP errors, llmkit's own errors and crashes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.errors import LlmkitError

log = logging.getLogger("llmkit.serve")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {**self.headers, **({"WWW-Authenticate": "Bearer"} if self.status == 401 else {})}
        return JSONResponse(body, status_code=self.status, headers=headers or None)


def request_id(r: Request) -> str:
    return getattr(r.state, "request_id", "-")


async def _api_error(r: Request, e: APIError) -> JSONResponse:
    if e.status >= 500:  # the traceback goes to the log under the request id the client also got
        log.error("request %s: %s %s -> %d %s", request_id(r), r.method, r.url.path, e.status, e.message,
                  exc_info=e.__cause__ or e)
        e.message = f"{e.message} (request id {request_id(r)}; the server log has the details)"
    return e.response()


async def _invalid(_r: Request, e: RequestValidationError) -> JSONResponse:
    errs = e.errors()
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                        code="invalid_json").response()
    param = ".".join(loc) or None
    msg = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}"
    return APIError(400, msg, param=param, code="invalid_value").response()



async def _http(_r: Request, e: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return APIError(e.status_code, str(e.detail), kind, headers=e.headers).response()  # 405 keeps its Allow



async def _llmkit(_r: Request, e: LlmkitError) -> JSONResponse:
    return APIError(400, str(e)).response()



def crash_response(rid: str, method: str, path: str, e: BaseException) -> JSONResponse:
    """A crash: the traceback to the log under the request id, a 500 naming only the id to the client."""
    log.error("request %s: %s %s crashed", rid, method, path, exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__} (request id {rid}; the server log has the "
                         "traceback)", "server_error").response()


def stream_error(rid: str, method: str, path: str, e: Exception) -> dict:
    """The error event of a stream that already answered 200 (OpenAI's and vLLM's `data: {"error": ...}`):
    logged like any other error (the traceback under the request id for a server error), the request id in
    the event, no traceback in it."""
    if isinstance(e, APIError) and e.status < 500:
        log.info("request %s: %s %s -> %d mid-stream: %s", rid, method, path, e.status, e.message)
        err = {"message": e.message, "type": e.type, "param": e.param, "code": e.code}
    else:
        log.error("request %s: %s %s failed mid-stream", rid, method, path, exc_info=e.__cause__ or e)
        what = e.message if isinstance(e, APIError) else f"internal error: {type(e).__name__}"
        err = {"message": f"{what} (request id {rid}; the server log has the details)", "type": "server_error",
               "param": None, "code": e.code if isinstance(e, APIError) else "internal_error"}
    return {"error": {**err, "request_id": rid}}


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error as an OpenAI error object (crashes: serve.server.Guard, via `crash_response`)."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(LlmkitError, _llmkit)

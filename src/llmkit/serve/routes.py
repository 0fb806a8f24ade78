"""The plain endpoints: the playground page, health, Prometheus metrics and the model list."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from llmkit.serve.schemas import ERROR_RESPONSES
from llmkit.serve.server import Server, check_api_key, server_of

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    page = resources.files("llmkit.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page)


@router.get("/health")
async def health(srv: Server = Depends(server_of)) -> JSONResponse:
    ok = srv.engine is None or srv.engine.alive
    return JSONResponse({"status": "ok" if ok else "engine stopped", "model": srv.name},
                        status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(srv: Server = Depends(server_of)) -> PlainTextResponse:
    e = srv.engine
    text = srv.metrics.render(e.n_waiting if e else 0, e.n_running if e else 0)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def model_card(srv: Server) -> dict[str, Any]:
    return {"id": srv.name, "object": "model", "created": srv.created, "owned_by": "llmkit",
            "max_model_len": srv.block_size, "arch": srv.model.cfg.arch}


@router.get("/v1/models", dependencies=[Depends(check_api_key)])
async def list_models(srv: Server = Depends(server_of)) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(srv)]}


@router.get("/v1/models/{model_id}", dependencies=[Depends(check_api_key)])
async def get_model(model_id: str, srv: Server = Depends(server_of)) -> dict[str, Any]:
    srv.check_model(model_id)
    return model_card(srv)

"""Liveness, readiness and the model card."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..deps import StateDep
from ..errors import error_body
from ..schemas import Health, Readiness

router = APIRouter(tags=["health"])
model_router = APIRouter(tags=["model"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (says nothing about the model or the store)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness,
            responses={503: {"description": "not ready; body has `error` and `checks`"}})
async def readyz(request: Request):
    """200 when the model is loaded, Redis answers PING and every gallery index matches the store.

    ``checks.durability`` says how Redis persists acknowledged writes (``durable`` false, with a ``warning``,
    when a crash of Redis could lose some; that alone does not make the service unready); ``checks.follower``
    where this process stands in the change log that keeps replicas' indexes in sync."""
    state = getattr(request.app.state, "reid", None)
    checks: dict[str, Any] = {"model": False, "store": False, "index": False}
    problems: list[str] = []
    if state is None or state.embedder is None:
        problems.append("model not loaded")
    else:
        checks["model"] = state.bundle.model_id
    if state is not None and state.persistence is not None:
        checks["durability"] = state.persistence.as_dict()
    if state is not None and state.follower is not None:
        checks["follower"] = {"connected": state.follower.connected, "applied": state.sync.applied,
                              "error": state.follower.error, "resyncs": state.sync.stats["resyncs"]}
    if state is not None and state.store is not None:
        try:
            await run_in_threadpool(state.store.ping)
            checks["store"] = True
            in_sync, index_problems = await run_in_threadpool(state.sync_status)
            checks["index"] = in_sync
            problems.extend(index_problems)
        except Exception as e:  # redis errors of any kind
            problems.append(f"Redis store unreachable: {e}")
    else:
        problems.append("store not connected")
    if problems:
        return JSONResponse(error_body("not_ready", "; ".join(problems), status="not_ready", checks=checks),
                            status_code=503, headers={"Retry-After": "5"})
    return Readiness(status="ready", checks=checks)


@model_router.get("/v1/model")
async def model_card(state: StateDep) -> dict[str, Any]:
    """The model card (``model.json``) of the loaded bundle."""
    return state.bundle.card

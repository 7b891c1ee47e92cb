"""The gateway's HTTP routes: thin functions that authenticate, parse, and call the services on `app.state`.

The dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency in its thread
pool, a thread hop per dependency per request for work that takes microseconds.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response

from online_rl.schema import AdapterVersion
from serve.admin import AdminService
from serve.auth import Caller
from serve.event_stream import EventStreamResponse
from serve.feedback import FeedbackService
from serve.protocol import (
    APIError,
    CanaryRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    FactsObject,
    FactsRequest,
    FeedbackObject,
    FeedbackRequest,
    PreferenceObject,
    PreferenceRequest,
    PromoteRequest,
    ResponsesRequest,
    RollbackRequest,
)
from serve.responses import ResponsesService
from serve.serving import ChatService, encode_json

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 415, 429, 503)}


async def require_json(content_type: Annotated[str | None, Header()] = None) -> None:
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise APIError(
            415,
            f"Content-Type must be application/json, not {content_type or 'missing'!r}",
            code="unsupported_media_type",
        )


async def current_caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    state = request.app.state
    caller = state.auth.authenticate(authorization)
    if not caller.is_service:  # the trainer's gate has no user rate limit (its concurrency is still capped)
        await state.rate_limiter.check(caller.key_id)
    return caller


async def current_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    return request.app.state.auth.require_admin(authorization)


async def current_operator(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    """The admin key or the service key (the trainer promotes the versions its gate passed)."""
    return request.app.state.auth.require_operator(authorization)


async def chat_service(request: Request) -> ChatService:
    return request.app.state.chat


async def feedback_service(request: Request) -> FeedbackService:
    return request.app.state.feedback


async def admin_service(request: Request) -> AdminService:
    return request.app.state.admin


async def responses_service(request: Request) -> ResponsesService:
    return request.app.state.responses


CallerDep = Annotated[Caller, Depends(current_caller)]
AdminDep = Annotated[Caller, Depends(current_admin)]
OperatorDep = Annotated[Caller, Depends(current_operator)]
ChatDep = Annotated[ChatService, Depends(chat_service)]
FeedbackDep = Annotated[FeedbackService, Depends(feedback_service)]
AdminServiceDep = Annotated[AdminService, Depends(admin_service)]
ResponsesDep = Annotated[ResponsesService, Depends(responses_service)]
IdempotencyHeader = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]
ClientHeader = Annotated[str | None, Header(alias="x-alignloop-client")]
JSON = [Depends(require_json)]

api = APIRouter()


async def answer(request: Request, caller: Caller, stream: bool, prepare, complete, open_stream) -> Response:
    """One answer, streamed or not, holding one of the caller's concurrency slots until its last byte."""
    limiter = request.app.state.concurrency
    await limiter.acquire(caller.key_id)
    streaming = False
    try:
        prepared = await prepare()
        if not stream:
            body = encode_json(await complete(prepared))
            return Response(body, media_type="application/json", headers=prepared.headers())
        relay = await open_stream(prepared)
        streaming = True  # from here the stream releases the slot when it ends
    finally:
        if not streaming:
            limiter.release(caller.key_id)

    return EventStreamResponse(relay, prepared.headers(), on_close=lambda: limiter.release(caller.key_id))


@api.post("/v1/chat/completions", dependencies=JSON, responses=ERRORS)
async def chat_completions(
    body: ChatCompletionRequest, caller: CallerDep, chat: ChatDep, request: Request, client: ClientHeader = None
):
    def prepare():
        return chat.prepare(body, caller, client or "api")

    return await answer(request, caller, bool(body.stream), prepare, chat.complete, chat.open_stream)


@api.post("/v1/completions", dependencies=JSON, responses=ERRORS)
async def completions(
    body: CompletionRequest, caller: CallerDep, chat: ChatDep, request: Request, client: ClientHeader = None
):
    """Plain text in and out, passed through to vLLM, recorded like chat answers (with the prompt as text)."""

    def prepare():
        return chat.prepare_completion(body, caller, client or "api")

    return await answer(request, caller, bool(body.stream), prepare, chat.complete, chat.open_stream)


@api.post("/v1/responses", dependencies=JSON, responses=ERRORS)
async def create_response(
    body: ResponsesRequest, caller: CallerDep, responses: ResponsesDep, request: Request, client: ClientHeader = None
):
    def prepare():
        return responses.prepare(body, caller, client or "api")

    return await answer(request, caller, bool(body.stream), prepare, responses.create, responses.open_stream)


def model_object(name: str, adapter: AdapterVersion | None) -> dict:
    entry = {"id": name, "object": "model", "created": int(adapter.created) if adapter else 0, "owned_by": "alignloop"}
    if adapter is not None:
        entry["adapter"] = {"name": adapter.name, "status": adapter.status, "metrics": adapter.metrics}
    return entry


@api.get("/v1/models", responses=ERRORS)
async def list_models(caller: CallerDep, request: Request) -> dict:
    data = [model_object(name, adapter) for name, adapter in request.app.state.table.public_names()]
    return {"object": "list", "data": data}


@api.get("/v1/models/{model}", responses=ERRORS)
async def retrieve_model(model: str, caller: CallerDep, request: Request) -> dict:
    """One model of /v1/models by its id: the alias, `base`, or a pinned version `llava-rlhf@vN`."""
    state = request.app.state
    found = state.table.public_model(model)
    if found is None and "@v" in model and state.chat.watcher is not None:
        await state.chat.watcher.refresh(force=True)  # a version registered a moment ago
        found = state.table.public_model(model)
    if found is None:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    return model_object(*found)


@api.post("/v1/feedback", dependencies=JSON, responses=ERRORS, status_code=200)
async def create_feedback(
    body: FeedbackRequest, caller: CallerDep, feedback: FeedbackDep, idempotency_key: IdempotencyHeader = None
) -> FeedbackObject:
    return await feedback.add_feedback(caller, body, idempotency_key)


@api.get("/v1/feedback/{feedback_id}", responses=ERRORS)
async def get_feedback(feedback_id: str, caller: CallerDep, feedback: FeedbackDep) -> FeedbackObject:
    return await feedback.get_feedback(caller, feedback_id)


@api.post("/v1/preferences", dependencies=JSON, responses=ERRORS)
async def create_preference(
    body: PreferenceRequest, caller: CallerDep, feedback: FeedbackDep, idempotency_key: IdempotencyHeader = None
) -> PreferenceObject:
    return await feedback.add_preference(caller, body, idempotency_key)


@api.post("/v1/images/{sha256}/facts", dependencies=JSON, responses=ERRORS)
async def add_image_facts(sha256: str, body: FactsRequest, caller: CallerDep, feedback: FeedbackDep) -> FactsObject:
    if not _SHA256.match(sha256):
        raise APIError(
            400,
            "the image id must be the sha256 of its bytes, as 64 lowercase hex digits",
            param="sha256",
            code="invalid_image_id",
        )
    return await feedback.add_facts(caller, sha256, body)


@api.get("/v1/versions", responses=ERRORS)
async def version_overview(
    _: CallerDep, admin: AdminServiceDep, recent: Annotated[int, Query(ge=0, le=100)] = 10
) -> dict:
    """The alias's current version, feedback since its promotion, and recent versions' eval metrics."""
    return await admin.version_overview(recent)


# ---- admin -----------------------------------------------------------------------------------------------------
@api.get("/v1/admin/adapters", responses=ERRORS)
async def admin_registry(_: AdminDep, admin: AdminServiceDep) -> dict:
    return await admin.registry()


@api.get("/v1/admin/aliases/{alias}/history", responses=ERRORS)
async def admin_history(alias: str, _: AdminDep, admin: AdminServiceDep) -> dict:
    return await admin.history(alias)


@api.post("/v1/admin/aliases/{alias}/promote", dependencies=JSON, responses=ERRORS)
async def admin_promote(alias: str, body: PromoteRequest, caller: OperatorDep, admin: AdminServiceDep) -> dict:
    """Stages the version on every healthy vLLM replica, then moves the alias; 409 `promote_refused` (recorded in
    the alias history) when a replica cannot load it. The admin key or the service key."""
    return await admin.promote(alias, body, caller)


@api.post("/v1/admin/aliases/{alias}/rollback", dependencies=JSON, responses=ERRORS)
async def admin_rollback(alias: str, body: RollbackRequest, _: AdminDep, admin: AdminServiceDep) -> dict:
    return await admin.rollback(alias, body)


@api.post("/v1/admin/aliases/{alias}/canary", dependencies=JSON, responses=ERRORS)
async def admin_canary(alias: str, body: CanaryRequest, _: AdminDep, admin: AdminServiceDep) -> dict:
    return await admin.canary(alias, body)


@api.delete("/v1/admin/users/{user_id}", responses=ERRORS)
async def admin_delete_user(user_id: str, _: AdminDep, admin: AdminServiceDep) -> dict:
    return await admin.delete_user(user_id)


# ---- operations ------------------------------------------------------------------------------------------------
@api.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@api.get("/ready", responses={503: {"model": ErrorResponse}})
async def ready(request: Request) -> dict:
    state = request.app.state
    if not state.pool.any_healthy:
        raise APIError(503, "no vLLM server is ready", code="engine_unavailable", headers={"Retry-After": "5"})
    return {
        "status": "ready",
        "upstreams": [u.base_url for u in state.pool.upstreams if u.healthy],
        "registry_revision": state.table.snapshot.revision,
    }


@api.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")

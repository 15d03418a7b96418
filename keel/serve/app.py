"""The FastAPI app: routes, lifespan (load, warm up, ready), metrics per request.

``build_app(engine, config, key_digests)`` returns an ASGI app (the FastAPI app inside keel's guard).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import Response as RawResponse

from keel.serve import protocol as P
from keel.serve.batching import DynamicBatcher, ExplainQueue
from keel.serve.docs import add_docs_routes
from keel.serve.engines import Engine
from keel.serve.errors import ServeError, check_model, error_response, install_error_handlers
from keel.serve.guard import Guard
from keel.serve.metrics import Metrics

logger = logging.getLogger(__name__)

ERRORS = {
    code: {"model": P.ErrorResponse, "description": text}
    for code, text in [
        (400, "invalid request (the envelope names the offending param)"),
        (401, "missing or invalid API key"),
        (404, "unknown model or route"),
        (408, "body not sent within serve.read_timeout_s"),
        (413, "body over serve.max_body_bytes"),
        (415, "body is not JSON"),
        (429, "queue full; retry after Retry-After seconds"),
        (504, "deadline (serve.timeout_s) passed"),
    ]
}


class State:
    def __init__(self, engine: Engine, config, metrics: Metrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.ready = False
        self.draining = False
        self.inflight = 0  # requests being answered (counted by the guard, streams included)
        self.batchers: dict[str, DynamicBatcher] = {}
        self.explainer: ExplainQueue | None = None  # explain: true work, on its own thread and queue
        self.explain_error: str | None = None  # why explain: true is off, when it is
        self.scheduler = None
        self.pool = None  # the model's one worker thread (set at start-up)
        self.created = P.now()


def build_app(engine: Engine, config, key_digests: list[bytes]):
    metrics = Metrics()
    state = State(engine, config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="keel-model")  # classify and embeddings take turns
        state.pool = pool
        if "classify" in engine.routes:
            state.batchers["classify"] = DynamicBatcher(
                engine.classify, "classify", config.max_batch_size, config.max_wait_ms, config.max_queue, metrics, pool
            )
        if "embeddings" in engine.routes:
            state.batchers["embeddings"] = DynamicBatcher(
                engine.embed, "embeddings", config.max_batch_size, config.max_wait_ms, config.max_queue, metrics, pool
            )
        for b in state.batchers.values():
            b.start()
        if "classify" in engine.routes:
            state.explainer = ExplainQueue(
                engine.explain,
                config.max_queue,
                metrics,
                yield_to=lambda: any(b.depth for b in state.batchers.values()),
            )
        if engine.kind == "causal-lm":
            from keel.serve.scheduler import Scheduler

            if engine.scheduler_factory is not None:  # another engine's token loop (llama.cpp)
                state.scheduler = engine.scheduler_factory(engine.tokenizer, config.max_running, metrics)
            else:
                state.scheduler = Scheduler(engine.lm, engine.tokenizer, config.max_running, metrics, engine.device)
            state.scheduler.start()
        await _warm_up(state)
        state.ready = True
        logger.info("ready: %s (%s, %s backend)", engine.model_id, engine.kind, engine.backend)
        try:
            yield
        finally:
            state.ready = False
            for b in state.batchers.values():
                await b.stop()
            if state.explainer:
                state.explainer.stop()
            if state.scheduler:
                await asyncio.get_running_loop().run_in_executor(None, state.scheduler.stop)
            pool.shutdown(wait=False)

    app = FastAPI(
        title="keel serve",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description=f"OpenAI-compatible API for `{engine.model_id}` ({engine.kind}). "
        'Errors use OpenAI\'s envelope {"error": {message, type, param, code}}.',
    )
    app.state.keel = state
    install_error_handlers(app)
    add_docs_routes(app)  # Swagger UI and ReDoc from keel's own assets: they work offline

    @app.get("/health/live", tags=["health"], summary="the process is up")
    async def live():
        return {"status": "ok"}

    @app.get(
        "/health/ready",
        tags=["health"],
        summary="the model is loaded and warmed up (503 while draining)",
        responses={503: {"model": P.ErrorResponse}},
    )
    async def ready():
        if state.draining:
            return error_response(503, "shutting down; no new requests", code="draining")
        if not state.ready:
            return error_response(503, "loading the model", code="not_ready")
        return {"status": "ready", "model": engine.model_id}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=RawResponse)
    async def prometheus():
        body, ctype = metrics.render()
        return RawResponse(body, media_type=ctype)

    @app.get("/v1/models", response_model=P.ModelList, tags=["openai"], responses=ERRORS)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=engine.model_id, created=state.created)])

    @app.post(
        "/v1/classify",
        response_model=P.ClassifyResponse,
        response_model_exclude_none=True,
        tags=["keel"],
        responses=ERRORS,
        summary="labels and class probabilities for one or more texts (dynamically batched)",
    )
    async def classify(body: P.ClassifyRequest):
        texts = _texts(state, "classify", body.model, body.input)
        if body.explain and state.explain_error:
            raise ServeError(400, state.explain_error, "explain", "unsupported_value")
        if body.explain and len(texts) > config.max_explain_inputs:
            raise ServeError(
                400,
                f"explain: true takes at most {config.max_explain_inputs} inputs per request "
                f"(serve.max_explain_inputs); got {len(texts)}",
                "input",
                "too_many_inputs",
            )
        started = time.monotonic()
        rows = await state.batchers["classify"].submit(texts, config.timeout_s)
        explanations = [None] * len(rows)
        if body.explain:  # heavy (n_steps forward and backward passes): its own queue and thread
            left = config.timeout_s - (time.monotonic() - started)
            explanations = await state.explainer.submit(left, texts, [r["label"] for r in rows], body.explain_steps)
        data = [
            P.Classification(
                index=i,
                label=r["label"],
                score=r["score"],
                scores=r["scores"],
                explanation=P.Explanation(**e) if e else None,
                mitigation=r.get("mitigation"),
            )
            for i, (r, e) in enumerate(zip(rows, explanations))
        ]
        n = sum(r["tokens"] for r in rows)
        return P.ClassifyResponse(data=data, model=engine.model_id, usage=P.Usage(prompt_tokens=n, total_tokens=n))

    @app.post(
        "/v1/embeddings",
        response_model=P.EmbeddingResponse,
        tags=["openai"],
        responses=ERRORS,
        summary="mean-pooled encoder states (dynamically batched)",
    )
    async def embeddings(body: P.EmbeddingRequest):
        texts = _texts(state, "embeddings", body.model, body.input)
        if body.dimensions is not None and body.dimensions != engine.embedding_size:
            raise ServeError(
                400,
                f"dimensions must be {engine.embedding_size} for {engine.model_id} (it cannot "
                f"shorten embeddings); got {body.dimensions}",
                "dimensions",
                "invalid_value",
            )
        rows = await state.batchers["embeddings"].submit(texts, config.timeout_s)
        n = sum(r["tokens"] for r in rows)
        vectors = [r["embedding"] for r in rows]
        if body.encoding_format == "base64":  # what the openai client asks for by default
            import base64

            import numpy as np

            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        return P.EmbeddingResponse(
            data=[P.Embedding(index=i, embedding=v) for i, v in enumerate(vectors)],
            model=engine.model_id,
            usage=P.Usage(prompt_tokens=n, total_tokens=n),
        )

    from keel.serve.generate import add_generation_routes

    add_generation_routes(app, state, ERRORS)
    known = {r.path for r in app.routes if hasattr(r, "path")}
    return Guard(
        app,
        key_digests,
        config.max_body_bytes,
        state,
        metrics,
        known,
        config.read_timeout_s,
        public_docs=config.public_docs,
    )


def _texts(state: State, route: str, model: str | None, inputs) -> list[str]:
    check_model(state, route, model)
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if not texts:
        raise ServeError(400, "input is empty; send a text or a non-empty list of texts", "input", "invalid_value")
    if len(texts) > state.config.max_inputs:
        raise ServeError(
            400,
            f"{len(texts)} inputs is over the limit of {state.config.max_inputs} per request "
            "(serve.max_inputs); split the request",
            "input",
            "too_many_inputs",
        )
    return texts


async def _warm_up(state: State) -> None:
    """One real forward pass per route before ready turns 200."""
    loop = asyncio.get_running_loop()
    engine = state.engine
    if engine.kind == "causal-lm":
        from keel.serve.generate import run_to_end

        await run_to_end(
            state,
            [engine.prompt_ids("Hello")],
            max_new=2,
            temperature=0.0,
            top_p=1.0,
            seed=None,
            stops=[],
            n=1,
            timeout_s=max(state.config.timeout_s, 120.0),
        )
        return
    if "classify" in engine.routes:
        await loop.run_in_executor(None, engine.classify, ["warm up"])
        # Loads the PyTorch model explanations run on, so the first explain request does not stall the classify
        # traffic beside it with imports and a model load; a run that cannot explain serves without explain.
        try:
            await loop.run_in_executor(state.explainer.executor, engine.explain, ["warm up"], engine.labels[:1], 4)
        except Exception as e:
            logger.exception("explain: true is off for this model: its PyTorch weights did not load")
            state.explain_error = f"explain: true is not available for this model ({type(e).__name__}); see the log"
    await loop.run_in_executor(None, engine.embed, ["warm up"])

"""The FastAPI app: routes, lifespan (load, warm up, ready), metrics per request.

``build_app(engine, config, key_digests, run_dir)`` returns an ASGI app (the FastAPI app inside keel's guard).

Serving a run directory, every classify/chat/completion response is remembered for `POST /v1/feedback`
(keel/serve/feedback.py), and the run's model version (keel/rundir.py's learn/state.json, which `keel learn`
writes) is polled: a promoted or rolled-back version is loaded and warmed up beside the one serving, then swapped
in between batches (a batch in flight finishes on the model it started on; a causal LM's running sequences finish
on theirs, while new ones wait), so no request fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

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
        self.run_dir: Path | None = None  # the served run directory (feedback, model versions), if one is served
        self.feedback = None  # keel.serve.feedback.FeedbackStore, when feedback is on
        self.feedback_off = "feedback is off"  # why, when it is
        self.responses = None  # keel.serve.feedback.ResponseLog
        self.swaps = 0  # model versions swapped in since start

    def remember(self, response_id: str, route: str, version: str, sha: str, items: list[dict]) -> None:
        if self.responses is not None:
            self.responses.add(response_id, route, version, sha, items)


def build_app(engine: Engine, config, key_digests: list[bytes], run_dir: str | Path | None = None, background=()):
    """``background``: coroutine functions run as tasks while the server is ready (`keel serve --learn`'s
    schedule), cancelled when it stops; one that fails is logged, and serving goes on."""
    from keel.serve.feedback import ResponseLog

    metrics = Metrics()
    state = State(engine, config, metrics)
    fb = config.feedback
    state.run_dir = Path(run_dir) if run_dir is not None else None
    if fb.enabled and state.run_dir is not None:
        state.responses = ResponseLog(fb.remember, fb.store_text)
    elif fb.enabled:
        state.feedback_off = f"feedback needs a served run directory; {engine.model_id} is a model, not a run"
    else:
        state.feedback_off = "feedback is off (serve.feedback.enabled: false)"

    def classify_rows(texts: list[str]) -> list[dict]:  # on the model thread; the engine may be swapped between
        served = state.engine
        rows = served.classify(texts)
        for r in rows:
            r["version"], r["model_sha256"] = served.version, served.model_sha256
        return rows

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="keel-model")  # classify and embeddings take turns
        state.pool = pool
        if "classify" in engine.routes:
            state.batchers["classify"] = DynamicBatcher(
                classify_rows, "classify", config.max_batch_size, config.max_wait_ms, config.max_queue, metrics, pool
            )
        if "embeddings" in engine.routes:
            state.batchers["embeddings"] = DynamicBatcher(
                lambda texts: state.engine.embed(texts),
                "embeddings",
                config.max_batch_size,
                config.max_wait_ms,
                config.max_queue,
                metrics,
                pool,
            )
        for b in state.batchers.values():
            b.start()
        if "classify" in engine.routes:
            state.explainer = ExplainQueue(
                lambda *args, **kwargs: state.engine.explain(*args, **kwargs),
                config.max_queue,
                metrics,
                yield_to=lambda: any(b.depth for b in state.batchers.values()),
            )
        if engine.kind == "causal-lm":
            from keel.serve.scheduler import Scheduler

            if engine.scheduler_factory is not None:  # another engine's token loop (llama.cpp)
                state.scheduler = engine.scheduler_factory(engine.tokenizer, config.max_running, metrics)
            else:
                state.scheduler = Scheduler(
                    engine.lm, engine.tokenizer, config.max_running, metrics, engine.device, config.decode
                )
                state.scheduler.version, state.scheduler.model_sha256 = engine.version, engine.model_sha256
            state.scheduler.start()
        await _warm_up(state)
        if state.responses is not None:
            from keel.rundir import feedback_db
            from keel.serve.feedback import FeedbackStore

            state.feedback = FeedbackStore(feedback_db(state.run_dir))
        watcher = None
        swappable = engine.kind == "classifier" or (engine.kind == "causal-lm" and engine.scheduler_factory is None)
        if swappable and state.run_dir is not None and fb.poll_s > 0:
            watcher = asyncio.create_task(_watch_versions(state, fb.poll_s))
        state.ready = True
        decode = ""
        if state.scheduler is not None and engine.scheduler_factory is None:
            decode = ", keel's decode step" if state.scheduler._decode is not None else ", transformers' forward"
        logger.info(
            "ready: %s (%s, %s backend, version %s%s)",
            engine.model_id,
            engine.kind,
            engine.backend,
            engine.version,
            decode,
        )
        tasks = [asyncio.create_task(_logged(fn)) for fn in background]
        try:
            yield
        finally:
            state.ready = False
            if watcher is not None:
                watcher.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if state.feedback is not None:
                state.feedback.close()
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

    # KServe's v2 paths answer the same probes, so its InferenceService (and other v2 clients) find them.
    @app.get("/health/live", tags=["health"], summary="the process is up")
    @app.get("/v2/health/live", tags=["health"], summary="the process is up (KServe's path)")
    async def live():
        return {"status": "ok"}

    @app.get(
        "/health/ready",
        tags=["health"],
        summary="the model is loaded and warmed up (503 while draining)",
        responses={503: {"model": P.ErrorResponse}},
    )
    @app.get(
        "/v2/health/ready",
        tags=["health"],
        summary="the model is loaded and warmed up (503 while draining; KServe's path)",
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
        rid = P.new_id("clf")
        items = [
            {
                "input": t,
                "output": r["label"],
                "label": r["label"],
                "version": r["version"],
                "model_sha256": r["model_sha256"],
            }
            for t, r in zip(texts, rows)
        ]
        state.remember(rid, "classify", rows[0]["version"], rows[0]["model_sha256"], items)
        return P.ClassifyResponse(
            id=rid, data=data, model=engine.model_id, usage=P.Usage(prompt_tokens=n, total_tokens=n)
        )

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
    from keel.serve.feedback import add_feedback_routes

    add_feedback_routes(app, state, ERRORS)
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


async def _logged(fn) -> None:
    try:
        await fn()
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("a background task of the server stopped; serving goes on")


async def _watch_versions(state: State, poll_s: float) -> None:
    """Poll the run's served version; load and warm up a new one off the model thread, then swap it in."""
    from keel.rundir import current_version

    loop = asyncio.get_running_loop()
    failed: str | None = None  # a version that would not load is not retried every poll
    while True:
        await asyncio.sleep(poll_s)
        try:
            version = current_version(state.run_dir)
        except Exception:  # a state file being replaced: read it at the next poll
            continue
        if version == state.engine.version or version == failed:
            continue
        old = state.engine
        try:
            new = await loop.run_in_executor(None, _load_warm, state.run_dir, state.config.backend, old)
        except Exception:
            logger.exception("version %s did not load; still serving %s", version, old.version)
            failed = version
            continue
        if new.kind == "causal-lm":  # the running sequences finish on the old weights, then the new ones start
            await loop.run_in_executor(None, state.scheduler.swap, new.lm, new.version, new.model_sha256)
        state.engine, failed = new, None  # one reference: the next batch runs on the new model
        state.swaps += 1
        logger.info("swapped model version %s -> %s (%s)", old.version, new.version, new.model_sha256[:12])


def _load_warm(run_dir: Path, backend: str, old: Engine) -> Engine:
    """The run's current version, loaded and run once (off the model thread: serving goes on meanwhile)."""
    from keel.serve.engines import load_engine

    new = load_engine(str(run_dir), backend, old.device)
    if new.kind == "causal-lm":
        import torch

        with torch.inference_mode():
            new.lm(input_ids=torch.tensor([new.prompt_ids("warm up")], device=new.device))
        return new
    new.forward_batch_size = old.forward_batch_size
    new.classify(["warm up"])
    new.embed(["warm up"])
    return new


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

"""/v1/completions and /v1/chat/completions: limits, the scheduler, and OpenAI's (streamed) responses.

The event loop only routes: chat templates and tokenization run on the engine's worker thread, decoding on the
scheduler's. A request that could never fit the queue is a 400 (a 429 would be retried forever); one that
does not fit now is a 429. A client that goes away, streaming or not, cancels its sequences at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from keel.serve import protocol as P
from keel.serve.errors import ServeError, check_model, envelope
from keel.serve.scheduler import Sequence

logger = logging.getLogger(__name__)


def add_generation_routes(app: FastAPI, state, errors: dict) -> None:
    @app.post(
        "/v1/completions",
        response_model=P.CompletionResponse,
        tags=["openai"],
        responses=errors,
        summary="text completion (continuous batching; stream=true for server-sent events)",
    )
    async def completions(body: P.CompletionRequest, request: Request):
        check_model(state, "completions", body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise ServeError(
                400, "prompt is empty; send a text or a non-empty list of texts", "prompt", "invalid_value"
            )
        if len(prompts) > state.config.max_inputs:
            raise ServeError(
                400,
                f"{len(prompts)} prompts is over serve.max_inputs={state.config.max_inputs}",
                "prompt",
                "too_many_inputs",
            )
        _check(state, body, len(prompts), "prompt")
        ids = await _off_loop(state, lambda: [state.engine.prompt_ids(p) for p in prompts])
        return await _serve(
            state,
            request,
            body,
            ids,
            body.max_tokens,
            "max_tokens",
            chat=False,
            echo=[p if body.echo else "" for p in prompts],
            inputs=prompts,
        )

    @app.post(
        "/v1/chat/completions",
        response_model=P.ChatResponse,
        tags=["openai"],
        responses=errors,
        summary="chat completion with the model's chat template (continuous batching; stream=true for SSE)",
    )
    async def chat(body: P.ChatRequest, request: Request):
        check_model(state, "chat", body.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages
        ]
        _check(state, body, 1, "messages")
        ids = [await _off_loop(state, lambda: state.engine.chat_ids(messages))]
        return await _serve(
            state,
            request,
            body,
            ids,
            body.max_completion_tokens or body.max_tokens,
            _tokens_param(body),
            chat=True,
            inputs=[json.dumps(messages, ensure_ascii=False)],  # what feedback on it refers to
        )


def _tokens_param(body) -> str:
    """The field the new-token bound came from: chat's max_completion_tokens wins over max_tokens."""
    return "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"


async def _off_loop(state, fn):
    """``fn()`` on the engine's worker thread: a chat template or a 2 MB prompt must not stall every other request."""
    return await asyncio.get_running_loop().run_in_executor(state.pool, fn)


def _check(state, body, n_prompts: int, prompt_param: str) -> None:
    """What can be checked before tokenizing: serve.* bounds, unsupported options, and a queue it could never fit."""
    cfg = state.config
    if body.n > cfg.max_n:
        raise ServeError(400, f"n={body.n} is over serve.max_n={cfg.max_n}", "n", "invalid_value")
    stops = body.stops()
    if len(stops) > cfg.max_stop:
        raise ServeError(
            400, f"{len(stops)} stop sequences is over serve.max_stop={cfg.max_stop}", "stop", "invalid_value"
        )
    if any(not s for s in stops) or any(len(s) > 256 for s in stops):
        raise ServeError(400, "each stop sequence must be 1 to 256 characters", "stop", "invalid_value")
    if body.presence_penalty or body.frequency_penalty:
        param = "presence_penalty" if body.presence_penalty else "frequency_penalty"
        raise ServeError(400, f"{param} is not supported by keel serve; leave it at 0", param, "unsupported_value")
    name = _tokens_param(body)
    value = getattr(body, name)
    if value is not None and value > cfg.max_tokens:
        raise ServeError(400, f"{name}={value} is over serve.max_tokens={cfg.max_tokens}", name, "invalid_value")
    choices = body.n * n_prompts
    if choices > cfg.max_queue:  # never fits, however long the client waits: not a 429
        param = "n" if body.n > 1 else prompt_param
        raise ServeError(
            400,
            f"this request asks for {choices} choices ({n_prompts} prompt(s) x n={body.n}); the "
            f"generation queue holds at most {cfg.max_queue} (serve.max_queue); send fewer prompts "
            "or a lower n",
            param,
            "too_many_inputs",
        )


def _max_new(state, prompt_ids: list[list[int]], max_tokens: int | None, tokens_param: str, chat: bool) -> int:
    """Max new tokens per choice, checked against the model's context; the error names what is too long."""
    cfg, prompt_param = state.config, "messages" if chat else "prompt"
    context = state.engine.max_length
    longest = max(len(ids) for ids in prompt_ids)
    if longest == 0:
        raise ServeError(400, "the prompt has no tokens", prompt_param, "invalid_value")
    if longest >= context:  # no room for a single new token, whatever max_tokens says
        raise ServeError(
            400,
            f"this model's context is {context} tokens and the prompt alone has {longest}; shorten the prompt",
            prompt_param,
            "context_length_exceeded",
        )
    wanted = max_tokens if max_tokens is not None else min(cfg.default_max_tokens, context - longest)
    if longest + wanted > context:
        raise ServeError(
            400,
            f"this model's context is {context} tokens; the prompt has {longest} and {tokens_param} "
            f"is {wanted}; lower {tokens_param} to at most {context - longest} or shorten the prompt",
            tokens_param,
            "context_length_exceeded",
        )
    return wanted


def _sequences(prompt_ids, n, max_new, body, emit, request_id="") -> list[Sequence]:
    seqs = []
    for p, ids in enumerate(prompt_ids):
        for k in range(n):
            seed = None if body.seed is None else (body.seed + p * n + k) % (2**63)
            seqs.append(
                Sequence(
                    ids,
                    max_new,
                    body.temperature,
                    body.top_p,
                    seed,
                    body.stops(),
                    p * n + k,
                    emit,
                    request_id=request_id,
                )
            )
    return seqs


def _submit(state, prompt_ids, n, max_new, body, request_id="") -> tuple[list[Sequence], asyncio.Queue]:
    """Hand the choices to the scheduler, or 429 when the queue has no room for them now."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(index, kind, payload):  # called on the scheduler thread
        loop.call_soon_threadsafe(events.put_nowait, (index, kind, payload))

    seqs = _sequences(prompt_ids, n, max_new, body, emit, request_id)
    if not state.scheduler.try_submit(seqs, state.config.max_queue):
        state.metrics.rejected.labels("queue_full").inc()
        raise ServeError(
            429,
            f"the generation queue is full ({state.config.max_queue}); retry shortly",
            None,
            "queue_full",
            {"Retry-After": "1"},
        )
    return seqs, events


async def run_to_end(state, prompt_ids, max_new, temperature, top_p, seed, stops, n, timeout_s):
    """Generate to the end without HTTP (the warm-up): returns (texts, finish_reasons, completion_tokens)."""
    body = P.CompletionRequest(prompt="", temperature=temperature, top_p=top_p, seed=seed, stop=stops or None, n=n)
    seqs, events = _submit(state, prompt_ids, n, max_new, body, "warm-up")
    return await _collect(seqs, events, timeout_s, None)


async def _watch_disconnect(request, events: asyncio.Queue) -> None:
    """Put a ``disconnect`` event on ``events`` as soon as the client goes away.

    The body has been read by then, so the next ASGI message is ``http.disconnect`` (or the end of the response,
    after which this task is cancelled).
    """
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                events.put_nowait((None, "disconnect", None))
                return
    except Exception:  # a server that cannot say: the deadline still ends the work
        logger.exception("cannot watch the connection of a generation request")


async def _collect(seqs, events, timeout_s, request):
    texts, finish, tokens = [""] * len(seqs), [None] * len(seqs), 0
    deadline = time.monotonic() + timeout_s
    watcher = asyncio.ensure_future(_watch_disconnect(request, events)) if request is not None else None
    try:
        while any(f is None for f in finish):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServeError(
                    504, f"the request did not finish within {timeout_s:g} s (serve.timeout_s)", None, "timeout"
                )
            try:
                index, kind, payload = await asyncio.wait_for(events.get(), left)
            except TimeoutError:
                continue
            if kind == "disconnect":
                return None
            if kind == "text":
                texts[index] += payload
            elif kind == "done":
                finish[index] = payload["finish_reason"]
                tokens += payload["completion_tokens"]
            else:
                raise ServeError(503, payload, None, "generation_failed")
        return texts, finish, tokens
    finally:
        if watcher is not None:
            watcher.cancel()
        for s in seqs:
            s.cancelled = True  # a timed-out or abandoned request frees its rows at the next step


async def _serve(state, request, body, prompt_ids, max_tokens, tokens_param: str, chat: bool, echo=None, inputs=None):
    max_new = _max_new(state, prompt_ids, max_tokens, tokens_param, chat)
    n_prompt = sum(len(ids) for ids in prompt_ids)
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    seqs, events = _submit(state, prompt_ids, body.n, max_new, body, rid)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _stream(state, seqs, events, rid, chat, body.n, n_prompt, include_usage, echo)
        return StreamingResponse(
            gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    result = await _collect(seqs, events, state.config.timeout_s, request)
    if result is None:  # the client left; nobody reads this answer
        raise ServeError(400, "client disconnected", None, "client_disconnected")
    texts, finish, n_completion = result
    usage = P.Usage(prompt_tokens=n_prompt, completion_tokens=n_completion, total_tokens=n_prompt + n_completion)
    model = state.engine.model_id
    if inputs is not None:  # for POST /v1/feedback: one item per choice (choice i answers prompt i // n)
        items = [{"input": inputs[i // body.n], "output": t} for i, t in enumerate(texts)]
        s = seqs[0]  # the scheduler's tag: a swap may fall after these ran (another engine's: none)
        version, sha = (s.version, s.model_sha256) if s.version else (state.engine.version, state.engine.model_sha256)
        state.remember(rid, "chat" if chat else "completions", version, sha, items)
    if chat:
        choices = [
            P.ChatChoice(index=i, message=P.ChatChoiceMessage(content=t), finish_reason=f)
            for i, (t, f) in enumerate(zip(texts, finish))
        ]
        return P.ChatResponse(id=rid, created=P.now(), model=model, choices=choices, usage=usage)
    choices = [
        P.CompletionChoice(index=i, text=(echo[i // body.n] if echo else "") + t, finish_reason=f)
        for i, (t, f) in enumerate(zip(texts, finish))
    ]
    return P.CompletionResponse(id=rid, created=P.now(), model=model, choices=choices, usage=usage)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _stream(state, seqs, events, rid, chat, n, n_prompt, include_usage, echo):
    """Server-sent events in OpenAI's chunk format, ending in ``data: [DONE]``; an error is one event."""
    model, created = state.engine.model_id, P.now()
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index, text=None, finish=None, first=False):
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]})

    finished, n_completion = 0, 0
    deadline = time.monotonic() + state.config.timeout_s
    try:
        for s in seqs:
            if chat:
                yield chunk(s.index, first=True)
            elif echo and echo[s.index // n]:
                yield chunk(s.index, echo[s.index // n])
        while finished < len(seqs):
            left = deadline - time.monotonic()
            if left <= 0:
                yield _sse(
                    envelope(
                        504,
                        f"the request did not finish within {state.config.timeout_s:g} s (serve.timeout_s)",
                        None,
                        "timeout",
                    )
                )
                break
            try:
                index, kind, payload = await asyncio.wait_for(events.get(), left)
            except TimeoutError:
                continue
            if kind == "text":
                yield chunk(index, payload)
            elif kind == "done":
                finished += 1
                n_completion += payload["completion_tokens"]
                yield chunk(index, finish=payload["finish_reason"])
            else:
                yield _sse(envelope(503, payload, None, "generation_failed"))
                break
        if include_usage:
            yield _sse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": n_prompt,
                        "completion_tokens": n_completion,
                        "total_tokens": n_prompt + n_completion,
                    },
                }
            )
        yield "data: [DONE]\n\n"
    finally:
        for s in seqs:  # a client that disconnects cancels its generation here
            s.cancelled = True

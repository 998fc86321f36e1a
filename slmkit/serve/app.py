"""The HTTP side: a Starlette app speaking OpenAI's API over an ``Engine``.

Routes: ``/v1/completions``, ``/v1/chat/completions`` (JSON or server-sent events), ``/v1/models``,
``/health`` (503 until the model is loaded), ``/metrics`` (Prometheus text), ``/tokenize``,
``/detokenize`` and ``/`` (the playground page). Every error is OpenAI's JSON shape with its status
(``protocol.ApiError``). A client that goes away, streaming or not, has its job cancelled at once;
the engine frees its rows before its next decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from json.encoder import encode_basestring_ascii as json_str  # json.dumps of a str, without its call layers
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from slmkit.chat import render_prompt
from slmkit.serve.config import ServeConfig
from slmkit.serve.engine import Engine, Event, Job, ModelInfo, QueueFull
from slmkit.serve.protocol import (
    ApiError, Request as Parsed, _ids, _messages, bad, chat_logprobs, completion_logprobs, parse_chat,
    parse_completion,
)

if TYPE_CHECKING:
    from slmkit.serve.process import ProcessEngine

STATIC = Path(__file__).parent / "static"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def sse_prefix(top: dict[str, Any]) -> bytes:
    """The start of every streamed completion chunk of one request, up to its choice's index: the
    head (id, object, created, model) serialised once per request, not once per token."""
    return b"data: " + json.dumps({**top, "choices": [{"index": 0}]})[:-4].encode()


def sse_text_chunk(prefix: bytes, index: int, text: str, finish_reason: str | None) -> bytes:
    """One server-sent event with a completion chunk without logprobs: the same bytes as
    sse-starlette's encoding of ``json.dumps({**top, "choices": [choice]})`` (tested), at a
    fraction of the cost per token."""
    reason = b"null" if finish_reason is None else json_str(finish_reason).encode()
    return b"%s%d, \"text\": %s, \"logprobs\": null, \"finish_reason\": %s}]}\r\n\r\n" % (
        prefix, index, json_str(text).encode(), reason)


class EventStream(EventSourceResponse):
    """sse-starlette's response for a stream of server-sent events, without a cancel scope around
    every event's send when no send timeout is set: ``move_on_after(None)`` never cancels, and
    entering and leaving it (anyio's backend lookup, ``current_task`` twice) cost the event loop
    more per streamed token than the rest of the event's send. (sse-starlette 3.x sends through
    ``_send_with_timeout``; elsewhere this class is the plain response.)"""

    async def _send_with_timeout(self, send, message) -> None:  # noqa: ANN001 - sse-starlette's signature
        if self.send_timeout is not None:
            return await super()._send_with_timeout(send, message)
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True
            raise


def create_app(engine: Engine | ProcessEngine, cfg: ServeConfig, model_name: str) -> Starlette:
    """The ASGI app serving ``engine``'s model as ``model_name`` (the engine on a thread of this
    process or in its own: the same calls)."""
    created = int(time.time())

    def handler(endpoint: str, auth: bool = True) -> Callable[[Callable[[Request], Awaitable[Response]]], Callable]:
        """Wrap a route: the API key, ApiError as OpenAI's error JSON, the request counter."""
        def wrap(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
            async def route(request: Request) -> Response:
                try:
                    if auth:
                        check_key(request)
                    response = await fn(request)
                except ApiError as e:
                    response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
                except ClientGone:
                    response = Response(status_code=499)
                engine.metrics.request(endpoint, response.status_code)
                return response
            return route
        return wrap

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            raise ApiError(401, "incorrect API key: send it as 'Authorization: Bearer KEY' (slm serve --api-key)",
                           code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body:
            raise ApiError(413, f"the body is {size} bytes, over the limit of {cfg.max_body}", code="request_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > cfg.max_body:
                raise ApiError(413, f"the body is over the limit of {cfg.max_body} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the body is not valid JSON: {e}") from None

    def loaded() -> tuple[ModelInfo, Any]:
        if engine.error:
            raise ApiError(503, engine.error)
        if not engine.ready:
            raise ApiError(503, "the model is still loading: retry in a moment", headers={"Retry-After": "1"})
        return engine.info, engine.tokenizer

    def submit(parsed: Parsed) -> Job:
        job = Job(parsed.seqs, engine.tokenizer, parsed.stop, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull:
            raise ApiError(429, f"the server is busy: {engine.max_queue} requests are waiting already; retry shortly",
                           code="server_overloaded", headers={"Retry-After": "1"}) from None
        return job

    async def wait_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect(job: Job, request: Request) -> list[str]:
        """Every choice's text, cancelling the job if the client goes away first."""
        texts, open_ = [""] * len(job.seqs), len(job.seqs)
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            while open_:
                get = asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    raise ClientGone
                event = get.result()
                if event.error:
                    raise ApiError(500, event.error)
                texts[event.index] += event.text
                open_ -= event.finish_reason is not None
        finally:
            gone.cancel()
            engine.cancel(job)
        return texts

    def usage(parsed: Parsed) -> dict[str, int]:
        prompt = sum(len(p) for p in parsed.prompts)
        completion = sum(len(s.tokens) for s in parsed.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def head(kind: str, rid: str) -> dict[str, Any]:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name}

    def finish(reason: str | None) -> str | None:
        return None if reason in (None, "cancelled") else reason

    # --- completions ------------------------------------------------------------------------------

    def completion_lps(parsed: Parsed, k: int, start: int, end: int, prompt_too: bool) -> dict | None:
        if not parsed.logprobs:
            return None
        seq, tok = parsed.seqs[k], engine.tokenizer
        tokens, lps, tops = seq.tokens[start:end], seq.token_logprobs[start:end], seq.top_logprobs[start:end]
        offset = 0
        if prompt_too:
            prompt_lps = seq.prompt_token_logprobs or [None] * len(seq.prompt)
            prompt_tops = seq.prompt_top_logprobs or [None] * len(seq.prompt)
            tokens, lps, tops = seq.prompt + tokens, prompt_lps + lps, prompt_tops + tops
        elif parsed.echo:
            offset = len(parsed.rendered[k // parsed.n])
        return completion_logprobs(tok, tokens, lps, tops, offset)

    @handler("completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request)
        info, tok = loaded()
        parsed = parse_completion(body, tok, info.block_size, info.vocab_size)
        job = submit(parsed)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if parsed.stream:
            return EventStream(stream_completion(parsed, job, rid))
        texts = await collect(job, request)
        choices = []
        for k, seq in enumerate(parsed.seqs):
            text = (parsed.rendered[k // parsed.n] if parsed.echo else "") + texts[k]
            choices.append({"index": k, "text": text, "logprobs": completion_lps(parsed, k, 0, len(seq.tokens), parsed.echo),
                            "finish_reason": finish(seq.finish_reason)})
        return JSONResponse({**head("text_completion", rid), "choices": choices, "usage": usage(parsed)})

    async def stream_completion(parsed: Parsed, job: Job, rid: str) -> AsyncIterator[dict[str, str]]:
        try:
            if parsed.echo:
                for k, seq in enumerate(parsed.seqs):
                    choice = {"index": k, "text": parsed.rendered[k // parsed.n], "logprobs": None, "finish_reason": None}
                    yield {"data": json.dumps({**head("text_completion", rid), "choices": [choice]})}
            top = head("text_completion", rid)
            before = sse_prefix(top)
            async for event in events(job):
                if not (event.text or event.finish_reason or parsed.logprobs and event.end > event.start):
                    continue
                if parsed.logprobs:
                    choice = {"index": event.index, "text": event.text,
                              "logprobs": completion_lps(parsed, event.index, event.start, event.end, False),
                              "finish_reason": finish(event.finish_reason)}
                    yield {"data": json.dumps({**top, "choices": [choice]})}
                    continue
                yield sse_text_chunk(before, event.index, event.text, finish(event.finish_reason))
            if parsed.include_usage:
                yield {"data": json.dumps({**head("text_completion", rid), "choices": [], "usage": usage(parsed)})}
            yield {"data": "[DONE]"}
        finally:
            engine.cancel(job)

    async def events(job: Job) -> AsyncIterator[Event]:
        """The job's events; those that queued up while the client was being written to are merged,
        one per choice, so a busy server sends fewer, longer chunks instead of falling behind."""
        open_ = len(job.seqs)  # choices not finished yet (the worker's flags may run ahead of the events)
        while open_:
            waiting = [await job.events.get()]
            while not job.events.empty():
                waiting.append(job.events.get_nowait())
            merged: dict[int, Event] = {}
            for event in waiting:
                if event.error:
                    raise ApiError(500, event.error)
                if event.index in merged:
                    m = merged[event.index]
                    m.text, m.end, m.finish_reason = m.text + event.text, event.end, event.finish_reason
                else:
                    merged[event.index] = event
            for event in merged.values():
                open_ -= event.finish_reason is not None
                yield event

    # --- chat -------------------------------------------------------------------------------------

    def chat_lps(parsed: Parsed, k: int, start: int, end: int) -> dict | None:
        if not parsed.logprobs:
            return None
        seq = parsed.seqs[k]
        return {"content": chat_logprobs(engine.tokenizer, seq.tokens[start:end], seq.token_logprobs[start:end],
                                         seq.top_logprobs[start:end])}

    @handler("chat")
    async def chat(request: Request) -> Response:
        body = await read_json(request)
        info, tok = loaded()
        parsed = parse_chat(body, tok, info.block_size, info.vocab_size)
        job = submit(parsed)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if parsed.stream:
            return EventStream(stream_chat(parsed, job, rid))
        texts = await collect(job, request)
        choices = [{"index": k, "message": {"role": "assistant", "content": texts[k]},
                    "logprobs": chat_lps(parsed, k, 0, len(seq.tokens)), "finish_reason": finish(seq.finish_reason)}
                   for k, seq in enumerate(parsed.seqs)]
        return JSONResponse({**head("chat.completion", rid), "choices": choices, "usage": usage(parsed)})

    async def stream_chat(parsed: Parsed, job: Job, rid: str) -> AsyncIterator[dict[str, str]]:
        def chunk(k: int, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> dict[str, str]:
            choice = {"index": k, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return {"data": json.dumps({**head("chat.completion.chunk", rid), "choices": [choice]})}

        try:
            for k in range(len(parsed.seqs)):
                yield chunk(k, {"role": "assistant", "content": ""})
            async for event in events(job):
                if event.text or parsed.logprobs and event.end > event.start:
                    yield chunk(event.index, {"content": event.text},
                                logprobs=chat_lps(parsed, event.index, event.start, event.end))
                if event.finish_reason:
                    yield chunk(event.index, {}, finish(event.finish_reason))
            if parsed.include_usage:
                yield {"data": json.dumps({**head("chat.completion.chunk", rid), "choices": [], "usage": usage(parsed)})}
            yield {"data": "[DONE]"}
        finally:
            engine.cancel(job)

    # --- the rest ---------------------------------------------------------------------------------

    @handler("models")
    async def models(request: Request) -> Response:
        info, tok = loaded()
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "slmkit",
                "context_length": info.block_size, "max_model_len": info.block_size,
                "parameters": info.parameters, "chat": info.chat}
        return JSONResponse({"object": "list", "data": [card]})

    @handler("tokenize")
    async def tokenize(request: Request) -> Response:
        body = await read_json(request)
        info, tok = loaded()
        if isinstance(body, dict) and "messages" in body:
            if tok.chat_template is None:
                raise bad("this model has no chat template: tokenize a 'prompt' instead", "messages")
            ids = render_prompt(_messages(body["messages"]), tok, tok.chat_template)
        elif isinstance(body, dict) and isinstance(body.get("prompt"), str):
            ids = tok.encode(body["prompt"])
        else:
            raise bad("send {\"prompt\": TEXT} or {\"messages\": [...]}", "prompt")
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": info.block_size,
                             "token_strs": [tok.decode([i]) for i in ids]})

    @handler("detokenize")
    async def detokenize(request: Request) -> Response:
        body = await read_json(request)
        info, tok = loaded()
        if not isinstance(body, dict) or not isinstance(body.get("tokens"), list):
            raise bad("send {\"tokens\": [ids]}", "tokens")
        return JSONResponse({"prompt": tok.decode(_ids(body["tokens"], info.vocab_size, "tokens"))})

    @handler("health", auth=False)
    async def health(request: Request) -> Response:
        if engine.ready:
            return JSONResponse({"status": "ok"})
        if engine.error or engine.load_error:
            return JSONResponse({"status": "failed", "error": engine.error or engine.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @handler("metrics", auth=False)
    async def metrics(request: Request) -> Response:
        await engine.sync_metrics()
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @handler("playground", auth=False)
    async def playground(request: Request) -> Response:
        return FileResponse(STATIC / "playground.html", media_type="text/html")

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "no such route" if status == 404 else "method not allowed"
        return JSONResponse(ApiError(status, f"{message}: {request.method} {request.url.path}").body(), status_code=status)

    routes = [
        Route("/", playground, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
    ]
    middleware = []
    if cfg.cors:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cfg.cors), allow_methods=["GET", "POST"],
                                     allow_headers=["authorization", "content-type"]))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.attach(asyncio.get_running_loop())  # the process engine receives on this loop
        yield

    return Starlette(routes=routes, middleware=middleware, exception_handlers={404: not_found, 405: not_found},
                     lifespan=lifespan)

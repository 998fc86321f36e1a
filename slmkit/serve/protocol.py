"""The OpenAI API's request bodies read into ``Seq``s, its errors, and its response shapes.

``parse_completion`` and ``parse_chat`` check every parameter (a wrong one is an ``ApiError`` 400
naming it, in OpenAI's error JSON) and return a ``Request``: the prompts as token ids and one
``Seq`` per choice (prompts x n). Sampling goes through ``SamplingConfig`` (its ``validate`` is the
range check), OpenAI's defaults where they differ from ``slm generate``'s: temperature 1, no top-k,
top-p 1, 16 tokens for a completion and the rest of the context for a chat reply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from slmkit.chat import ROLES, render_prompt, render_text, special_ids
from slmkit.errors import SlmError
from slmkit.generate.continuous import Seq
from slmkit.generate.sampling import SamplingConfig

MAX_STOP = 4
MAX_LOGPROBS = 20
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Request:
    """A parsed completion or chat request."""

    kind: str  # "completion" or "chat"
    prompts: list[list[int]]
    seqs: list[Seq]  # prompt i's choice j is seqs[i * n + j]
    n: int
    stop: list[str]
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: bool = False
    rendered: list[str] = field(default_factory=list)  # the prompts as text (chat: the rendered template)


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def _typed(body: dict, name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad(f"'{name}' must be {what}, got {value!r}", name)
    return value


def _number(body: dict, name: str, default: float | None, lo: float = -math.inf, hi: float = math.inf,
            open_lo: bool = False) -> float | None:
    value = _typed(body, name, (int, float), default, "a number")
    if value is not None and not (math.isfinite(value) and (value > lo if open_lo else value >= lo) and value <= hi):
        side = f"> {lo}" if open_lo else f">= {lo}"
        raise bad(f"'{name}' must be {side} and <= {hi}, got {value}", name)
    return value


def _int(body: dict, name: str, default: int | None, lo: int = 0, hi: int | None = None) -> int | None:
    value = _typed(body, name, (int,), default, "an integer")
    if value is not None and (value < lo or hi is not None and value > hi):
        raise bad(f"'{name}' must be between {lo} and {hi}, got {value}" if hi is not None
                  else f"'{name}' must be >= {lo}, got {value}", name)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return stops


def _ids(value: Any, vocab: int, param: str) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad(f"'{param}' token ids must be integers", param)
    if any(not 0 <= t < vocab for t in value):
        raise bad(f"'{param}' has a token id outside the vocabulary (0 to {vocab - 1})", param)
    return list(value)


def _prompts(value: Any, tokenizer, vocab: int) -> tuple[list[list[int]], list[str]]:
    """A completion prompt in any of its four forms, as token ids (and text)."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        texts = value
    elif isinstance(value, list) and value and all(isinstance(p, int) and not isinstance(p, bool) for p in value):
        ids = _ids(value, vocab, "prompt")
        return [ids], [tokenizer.decode(ids)]
    elif isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        lists = [_ids(p, vocab, "prompt") for p in value]
        return lists, [tokenizer.decode(ids) for ids in lists]
    else:
        raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists", "prompt")
    return [tokenizer.encode(t) for t in texts], list(texts)


def _messages(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    turns = []
    for i, m in enumerate(value):
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages")
        turns.append((role, content))
    return turns


def _logit_bias(body: dict, vocab: int) -> dict[int, float]:
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("'logit_bias' must map token ids to numbers from -100 to 100", "logit_bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad(f"'logit_bias' key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token < vocab:
            raise bad(f"'logit_bias' token id {token} is outside the vocabulary (0 to {vocab - 1})", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise bad(f"'logit_bias' values must be numbers from -100 to 100, got {bias!r}", "logit_bias")
        out[token] = float(bias)
    return out


def _refuse(body: dict, names: tuple[str, ...]) -> None:
    for name in names:
        if body.get(name) not in (None, [], False):
            raise bad(f"'{name}' is not supported by slm serve", name)


def _context_check(prompt: list[int], max_tokens: int | None, default: int | None, block: int) -> int:
    """The number of tokens to generate; 400 naming the context when the prompt (and max_tokens) do not fit."""
    if max_tokens == 0 and len(prompt) <= block + 1:
        return 0  # scoring: the last token is only a target, as in each of slm eval's windows
    if len(prompt) > block:
        raise bad(f"the prompt is {len(prompt)} tokens, over this model's context of {block} tokens: shorten it",
                  "prompt")
    room = block - len(prompt)
    if max_tokens is None:
        if room == 0:
            raise bad(f"the prompt fills this model's context of {block} tokens: no room to generate", "prompt")
        return room if default is None else min(default, room)
    if len(prompt) + max_tokens > block:
        raise bad(f"this model's context is {block} tokens, but {len(prompt) + max_tokens} were requested "
                  f"({len(prompt)} in the prompt, {max_tokens} to generate): lower max_tokens to {room} or less",
                  "max_tokens")
    return max_tokens


def _sampling(body: dict, tokenizer, vocab: int, n_prompts: int, n: int, max_tokens: list[int], stop: list[str],
              end_ids: tuple[int, ...], logprobs: int | None, prompt_logprobs: bool) -> list[Seq]:
    """One ``Seq`` per choice, with the request's sampling parameters."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_lo=True)
    top_k = _int(body, "top_k", 0, -1)  # -1 (vLLM's "off") or 0: off
    min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
    repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.0, open_lo=True)
    presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    seed = _int(body, "seed", None, 0)
    ignore_eos = _typed(body, "ignore_eos", (bool,), False, "true or false")
    min_tokens = _int(body, "min_tokens", 0, 0)
    bias = _logit_bias(body, vocab)
    seqs = []
    for i in range(n_prompts):
        for j in range(n):
            index = i * n + j
            cfg = SamplingConfig(max_new_tokens=max(1, max_tokens[i]), temperature=temperature, top_k=max(top_k, 0),
                                 top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, stop=stop,
                                 stop_at_eot=not ignore_eos, seed=None if seed is None else seed + index)
            try:
                cfg.validate()
            except SlmError as e:
                raise bad(str(e)) from None
            ends = tuple(t for t in end_ids if t != tokenizer.eot_id or not ignore_eos)
            seqs.append(Seq(prompt=[], cfg=cfg, max_new_tokens=max_tokens[i], end_ids=ends,
                            min_tokens=min(min_tokens, max_tokens[i]), presence_penalty=presence,
                            frequency_penalty=frequency, logit_bias=bias, logprobs=logprobs,
                            prompt_logprobs=prompt_logprobs))
    return seqs


def _common(body: dict) -> tuple[int, bool, bool, list[str]]:
    n = _int(body, "n", 1, 1, 16)
    stream = _typed(body, "stream", (bool,), False, "true or false")
    options = _typed(body, "stream_options", (dict,), {}, "an object")
    include_usage = bool(options.get("include_usage")) if stream else False
    return n, stream, include_usage, _stop(body)


def parse_completion(body: Any, tokenizer, block: int, vocab: int) -> Request:
    """A ``/v1/completions`` body as a ``Request``."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    _refuse(body, ("suffix",))
    if _int(body, "best_of", None, 1) not in (None, 1) and body.get("best_of") != body.get("n", 1):
        raise bad("'best_of' is not supported (use n)", "best_of")
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    prompts, texts = _prompts(body["prompt"], tokenizer, vocab)
    prompts = [p or [tokenizer.eot_id] for p in prompts]  # an empty prompt starts a new document
    n, stream, include_usage, stop = _common(body)
    echo = _typed(body, "echo", (bool,), False, "true or false")
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = _int(body, "max_tokens", None, 0)
    if max_tokens == 0 and not echo:
        raise bad("'max_tokens' = 0 generates nothing: it is for scoring a prompt with echo=true and logprobs", "max_tokens")
    limits = [_context_check(p, max_tokens, 16, block) for p in prompts]
    seqs = _sampling(body, tokenizer, vocab, len(prompts), n, limits, stop, (tokenizer.eot_id,), logprobs,
                     echo and logprobs is not None)
    for k, seq in enumerate(seqs):
        seq.prompt = prompts[k // n]
    return Request("completion", prompts, seqs, n, stop, stream, include_usage, echo, logprobs is not None, texts)


def parse_chat(body: Any, tokenizer, block: int, vocab: int) -> Request:
    """A ``/v1/chat/completions`` body as a ``Request``; 400 when the run has no chat template."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    template = tokenizer.chat_template
    if template is None:
        raise bad("this model has no chat template (its tokenizer has no chat tokens), so it serves only "
                  "/v1/completions: fine-tune it on chat data (slm prepare on chat records, then slm finetune) "
                  "to chat with it", "messages")
    _refuse(body, ("tools", "functions", "tool_choice", "function_call"))
    turns = _messages(body.get("messages"))
    prompt = render_prompt(turns, tokenizer, template)
    n, stream, include_usage, stop = _common(body)
    logprobs = _typed(body, "logprobs", (bool,), False, "true or false")
    top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1)
    limit = _context_check(prompt, max_tokens, None, block)
    end = special_ids(tokenizer, template)[template["end"]]
    seqs = _sampling(body, tokenizer, vocab, 1, n, [limit], stop, (end, tokenizer.eot_id),
                     (top or 0) if logprobs else None, False)
    for seq in seqs:
        seq.prompt = prompt
    rendered = render_text(turns, template, add_generation_prompt=True)
    return Request("chat", [prompt], seqs, n, stop, stream, include_usage, False, logprobs, [rendered])


# --- responses ------------------------------------------------------------------------------------


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(tokenizer, tokens: list[int], lps: list[float | None],
                        tops: list[list[tuple[int, float]] | None], offset: int) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for these tokens, text offsets from ``offset``."""
    strings = [token_text(tokenizer, t) for t in tokens]
    offsets = []
    for s in strings:
        offsets.append(offset)
        offset += len(s)
    top = [None if t is None else {token_text(tokenizer, i): lp for i, lp in t} for t in tops]
    return {"tokens": strings, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer, tokens: list[int], lps: list[float], tops: list[list[tuple[int, float]]]) -> list[dict]:
    """The chat ``logprobs.content`` list for these tokens."""
    def entry(t: int, lp: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, t), "logprob": lp, "bytes": list(tokenizer.decode_bytes([t]))}

    return [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top in zip(tokens, lps, tops)]

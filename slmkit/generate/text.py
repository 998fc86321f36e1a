"""Text: ``TextStream`` turns tokens into printable pieces (incremental UTF-8, stop strings);
``generate`` and ``stream`` are the text API."""

from __future__ import annotations

import codecs
from collections.abc import Collection, Iterator

from slmkit.generate.beam import beam_search
from slmkit.generate.generation import Generation
from slmkit.generate.sampling import SamplingConfig

class TextStream:
    """Token ids in, printable text pieces out, for showing text while it is generated.

    A token may end in the middle of a UTF-8 character: bytes are decoded incrementally, so an
    incomplete character waits for the token that completes it. Text that could be the beginning
    of a stop string is held back until it is clear; at a stop string the text is cut right before
    it and ``stopped`` becomes true. Tokens in ``hidden`` (a chat reply's special tokens) show nothing.
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), hidden: Collection[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._stops = [s for s in stop if s]
        self._hidden = frozenset(hidden)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to show (often "")."""
        if self.stopped or token in self._hidden:
            return ""
        self._pending += self._utf8.decode(self._tokenizer.decode_bytes([token]))
        return self._release(final=False)

    def finish(self) -> str:
        """The held-back rest at the end (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending, self.stopped = self._pending[: min(hits)], "", True
            return out
        keep = 0 if final else self._partial_stop_length()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return out

    def _partial_stop_length(self) -> int:
        """Length of the longest end of the pending text that begins some stop string."""
        text, best = self._pending, 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _beam_text(model, tokenizer, prompt_ids: list[int], cfg: SamplingConfig, stop_ids: Collection[int] = (),
               hidden: Collection[int] = ()) -> str:
    def visible(tokens: list[int]) -> str:
        return tokenizer.decode([t for t in tokens if t not in hidden])

    def hits_stop(tokens: list[int]) -> bool:
        return _cut_at_stop(visible(tokens), cfg.stop)[1]

    tokens = beam_search(model, prompt_ids, cfg, tokenizer.eot_id, stop_ids=stop_ids,
                         is_finished=hits_stop if cfg.stop else None)
    return _cut_at_stop(visible(tokens), cfg.stop)[0]


def generate(model, tokenizer, prompts: list[str], cfg: SamplingConfig) -> list[str]:
    """Continue each prompt (in one batch); return the completions only, without the prompts,
    cut before the first stop string."""
    cfg.validate()
    if not prompts:
        return []
    if cfg.beams > 1:
        return [_beam_text(model, tokenizer, tokenizer.encode(p), cfg) for p in prompts]
    gen = Generation(model, [tokenizer.encode(p) for p in prompts], cfg, tokenizer.eot_id)
    streams = [TextStream(tokenizer, cfg.stop) for _ in prompts]
    pieces: list[list[str]] = [[] for _ in prompts]
    while not gen.finished:
        for row, token in gen.step().items():
            pieces[row].append(streams[row].push(token))
            if streams[row].stopped:
                gen.finish(row)
    return ["".join(p) + s.finish() for p, s in zip(pieces, streams)]


def stream(model, tokenizer, prompt: str, cfg: SamplingConfig) -> Iterator[str]:
    """Continue one prompt, yielding text pieces as they are produced (never half a character,
    never part of a stop string). Beam search knows its answer only at the end: one piece."""
    yield from stream_ids(model, tokenizer, tokenizer.encode(prompt), cfg)


def stream_ids(model, tokenizer, prompt_ids: list[int], cfg: SamplingConfig, *, stop_ids: Collection[int] = (),
               hidden: Collection[int] = ()) -> Iterator[str]:
    """``stream`` from token ids: generation also ends at any of ``stop_ids`` (a chat template's
    end token), and tokens in ``hidden`` are never shown. Beam search yields its answer at the end."""
    cfg.validate()
    if cfg.beams > 1:
        yield _beam_text(model, tokenizer, prompt_ids, cfg, stop_ids, hidden)
        return
    gen = Generation(model, [prompt_ids], cfg, tokenizer.eot_id, stop_ids=stop_ids)
    text = TextStream(tokenizer, cfg.stop, hidden)
    while not gen.finished:
        for token in gen.step().values():
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                gen.finish(0)
    rest = text.finish()
    if rest:
        yield rest

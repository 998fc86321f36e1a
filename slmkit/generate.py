"""Generation: continue text with a trained model, the right way, in plain Python.

Read top to bottom:

1. ``SamplingConfig``: every decoding option, checked before any work starts.
2. Logits processors: one small function per method (repetition penalty, temperature, top-k,
   top-p, min-p), chained into a pipeline, then greedy argmax or a seeded draw.
3. Runners: how the model is run. With the KV cache the prompt is prefilled in one forward pass,
   then each step runs one token per row ("fast": ``cpu_decode.CPUDecoder`` for float32 on the
   CPU, ``gpu_decode.GraphDecoder`` (a CUDA graph of the step) on a GPU, else ``GPT.decode_step``;
   "step": always ``GPT.decode_step``; "cached": the module path
   ``GPT.forward_cached``). "uncached" re-runs the whole window every step, as nanoGPT does; it is
   the reference the cached paths are tested against. All of them follow the context rule below
   (the uncached reference slides each row's window on its own).
4. ``Generation``: a batch of prompts continued one token per step; ``generate_tokens`` on top.
5. ``beam_search``: the most likely continuation instead of a sample.
6. Text: ``TextStream`` turns tokens into printable pieces (incremental UTF-8, stop strings);
   ``generate`` and ``stream`` are the text API.
7. The CLI: ``slm generate`` and ``slm chat``.

The context rule. A prompt longer than the context (``block_size``) is cut from the left, with a
warning. When generation fills the context, the window slides: each row keeps its last
``block_size // 2`` tokens (``slide_window``, which ``export.OnnxGenerator`` uses too), which are
prefilled into a fresh cache, and generation goes on. (With learned positions nothing else is
possible, since positions stop at ``block_size``; for rotary positions it is still the only exact
choice, because cached keys of later layers depend on everything the token saw.) In a batch all
rows slide together, when the longest row fills the context, so a shorter row may slide earlier
than it would alone; until then a batch gives exactly the tokens of one-by-one runs.
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch

from slmkit import cpu_decode, gpu_decode
from slmkit.errors import SlmError
from slmkit.model import KVCache
from slmkit.runtime import resolve_device

# --- 1. options -----------------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    """How to pick each next token. The defaults suit a small story model."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy (always the most likely token)
    top_k: int | None = 200  # keep the k most likely tokens; None or 0 = off
    top_p: float = 0.95  # nucleus: keep the fewest tokens whose probability adds up to p; 1.0 = off
    min_p: float = 0.0  # drop tokens less likely than min_p * the top token's probability; 0 = off
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the context less likely; 1.0 = off
    stop: list[str] = field(default_factory=list)  # end at the first of these strings (not included)
    stop_at_eot: bool = True  # end at <|endoftext|>
    seed: int | None = None  # makes sampling reproducible
    beams: int = 1  # > 1: beam search for the most likely continuation (deterministic)
    length_penalty: float = 1.0  # beam search: score = log-prob / length ** length_penalty

    def validate(self) -> None:
        """Raise SlmError for an out-of-range value, naming the option and the allowed range."""
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k is None or self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1] (0 = off), got {self.min_p}"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty, got {self.stop!r}"),
            (self.seed is None or self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.beams >= 1, f"beams must be at least 1, got {self.beams}"),
            (math.isfinite(self.length_penalty), f"length_penalty must be a finite number, got {self.length_penalty}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SlmError(message)


# --- 2. logits processors: (B, vocab) logits in, the same shape out ---------------------------------

Processor = Callable[[torch.Tensor], torch.Tensor]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019), as in Hugging Face: for every token already in the
    context (``seen``, a (B, vocab) bool mask), divide a positive logit by ``penalty`` and multiply
    a negative one by it, so that penalty > 1 always makes the token less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen (< 1) or flatten (> 1) the distribution."""
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits of each row (ties broken by torch.topk)."""
    if k >= logits.size(-1):
        return logits
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, -math.inf).scatter_(-1, indices, values)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the most likely tokens until their
    probabilities add up to at least ``p``; the most likely token always stays."""
    return apply_top_k_top_p(logits, logits.size(-1), p)  # top-k of the whole vocabulary is a sort


def apply_top_k_top_p(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """``apply_top_p(apply_top_k(logits, k), p)`` with one ``topk`` instead of a sort of the whole
    vocabulary (the nucleus is taken among the k largest, which ``topk`` returns in order)."""
    values, indices = logits.topk(min(k, logits.size(-1)), dim=-1)
    probs = values.softmax(dim=-1)
    values = values.masked_fill(probs.cumsum(dim=-1) - probs >= p, -math.inf)
    return torch.full_like(logits, -math.inf).scatter_(-1, indices, values)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): drop tokens whose probability is below ``min_p`` times
    the most likely token's, a cut that adapts to how confident the model is."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -math.inf)


def logits_pipeline(cfg: SamplingConfig, seen: torch.Tensor | None = None) -> list[Processor]:
    """The processors ``cfg`` switches on, in Hugging Face's order. Greedy decoding (temperature 0)
    keeps only the repetition penalty: the others never change the argmax."""
    steps: list[Processor] = []
    if cfg.repetition_penalty != 1.0 and seen is not None:
        steps.append(partial(apply_repetition_penalty, seen=seen, penalty=cfg.repetition_penalty))
    if cfg.temperature == 0:
        return steps
    if cfg.temperature != 1.0:
        steps.append(partial(apply_temperature, temperature=cfg.temperature))
    if cfg.top_k and cfg.top_p < 1.0:
        steps.append(partial(apply_top_k_top_p, k=cfg.top_k, p=cfg.top_p))
    elif cfg.top_k:
        steps.append(partial(apply_top_k, k=cfg.top_k))
    elif cfg.top_p < 1.0:
        steps.append(partial(apply_top_p, p=cfg.top_p))
    if cfg.min_p > 0:
        steps.append(partial(apply_min_p, min_p=cfg.min_p))
    return steps


def choose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row (B,): the argmax when greedy, else a draw from the softmax.

    The draw inverts the cumulative distribution with one uniform number per row: exact, and on
    a CPU about 10x cheaper than ``torch.multinomial`` over a 4k vocabulary (14 vs 180 us a step)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # float64 sums keep even a one-in-a-million token's share of [0, 1) right (MPS has no float64)
    dtype = torch.float32 if logits.device.type == "mps" else torch.float64
    cdf = logits.softmax(dim=-1, dtype=dtype).cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=dtype, device=logits.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total: never a p = 0 token
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A private random stream, so a seed reproduces a sample without touching global state."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# --- 3. runners: the model's next-token logits for each row, step by step ---------------------------

Path = Literal["fast", "step", "cached", "uncached"]


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def fit_context(ids: list[int], block_size: int, eot_id: int | None = None) -> list[int]:
    """A prompt as the model will see it: cut from the left to the context, with a warning; an
    empty prompt becomes ``<|endoftext|>``, the start of a new document."""
    if not ids:
        if eot_id is None:
            raise SlmError("the prompt is empty and the tokenizer has no <|endoftext|> to start from: give a prompt")
        return [eot_id]
    if len(ids) > block_size:
        warnings.warn(
            f"prompt of {len(ids)} tokens is longer than the context ({block_size}): "
            f"keeping its last {block_size} tokens",
            stacklevel=3,
        )
        return list(ids[-block_size:])
    return list(ids)


def slide_window(context: list[int], block_size: int) -> list[int]:
    """The context rule for a full window (one token more than ``block_size``): the last
    ``block_size // 2`` tokens (at least one) are what the model sees next. Every generation path
    uses this, ``OnnxGenerator`` too, so all of them give the same tokens past the context."""
    return list(context[-max(1, block_size // 2) :])


class CachedRunner:
    """Run the model with a KV cache: prefill every row's context at once (left-padded), then one
    token per row per step. When the cache is full, every row keeps its last ``block_size // 2``
    tokens and they are prefilled into a fresh cache (the window slides)."""

    def __init__(self, model, contexts: list[list[int]], max_new_tokens: int, path: Path = "fast") -> None:
        self.model = model
        self.block_size = model.config.block_size
        self.device, self.dtype = _device_dtype(model)
        self.contexts = [list(c) for c in contexts]  # what the cache holds, to prefill again
        self.budget = max_new_tokens  # tokens still to come: the cache needs no more slots
        self.step = self._one_token_step(path)  # weights looked up once here, not every step
        self.logits = self._prefill()

    def _one_token_step(self, path: Path) -> Callable[[torch.Tensor, KVCache], torch.Tensor]:
        """(ids (B,), cache) -> logits (B, vocab): the fastest step for this model, or the one asked for."""
        model = self.model
        if path == "fast" and cpu_decode.supported(model):
            return cpu_decode.CPUDecoder(model).step
        if path == "fast" and gpu_decode.supported(model):
            return gpu_decode.GraphDecoder(model).step
        if path == "step" or (path == "fast" and model.reads_float_weights()):
            return partial(model.decode_step, weights=model.decode_weights())
        # "cached", or "fast" on int8-quantized linears: through the modules
        return lambda idx, cache: model.forward_cached(idx[:, None], cache)

    def _prefill(self) -> torch.Tensor:
        n = max(len(c) for c in self.contexts)
        start = torch.tensor([n - len(c) for c in self.contexts])
        ids = torch.tensor([[0] * (n - len(c)) + c for c in self.contexts], device=self.device)
        slots = min(self.block_size, n + self.budget)
        self.cache = KVCache.empty(self.model.config, len(self.contexts), start=start, max_len=slots,
                                   device=self.device, dtype=self.dtype)
        return self.model.forward_cached(ids, self.cache).float()

    def advance(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; return (and keep in ``.logits``) the next-token logits."""
        self.budget -= 1
        for context, token in zip(self.contexts, tokens):
            context.append(token)
        if self.cache.length == self.block_size:  # the context is full: slide the window
            self.contexts = [slide_window(c, self.block_size) for c in self.contexts]
            self.logits = self._prefill()
        else:
            self.logits = self.step(torch.tensor(tokens, device=self.device), self.cache).float()
        return self.logits

    def select(self, rows: list[int]) -> None:
        """Keep these rows, in this order (repeats allowed): drop finished rows, follow beams."""
        self.contexts = [list(self.contexts[r]) for r in rows]
        index = torch.tensor(rows, device=self.device)
        self.cache.reorder(index)
        self.logits = self.logits[index]


class UncachedRunner:
    """The reference: re-run the model over each row's whole window at every step, as nanoGPT and
    llama2.c's Python do. Same context rule as ``CachedRunner``, so the same tokens, only slower."""

    def __init__(self, model, contexts: list[list[int]], max_new_tokens: int = 0) -> None:
        self.model = model
        self.block_size = model.config.block_size
        self.device, _ = _device_dtype(model)
        self.contexts = [list(c) for c in contexts]
        self.logits = self._run()

    def _run(self) -> torch.Tensor:
        rows = [self.model(torch.tensor([c], device=self.device), last_only=True)[0][:, -1] for c in self.contexts]
        return torch.cat(rows).float()

    def advance(self, tokens: list[int]) -> torch.Tensor:
        for context, token in zip(self.contexts, tokens):
            context.append(token)
            if len(context) > self.block_size:
                context[:] = slide_window(context, self.block_size)
        self.logits = self._run()
        return self.logits

    def select(self, rows: list[int]) -> None:
        self.contexts = [list(self.contexts[r]) for r in rows]
        self.logits = self.logits[torch.tensor(rows, device=self.logits.device)]


def make_runner(path: Path, model, contexts: list[list[int]], max_new_tokens: int):
    if path in ("fast", "step", "cached"):
        return CachedRunner(model, contexts, max_new_tokens, path)
    if path == "uncached":
        return UncachedRunner(model, contexts, max_new_tokens)
    raise ValueError(f"unknown path {path!r}: choose fast, step, cached or uncached")


def _seen_mask(contexts: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    seen = torch.zeros(len(contexts), vocab_size, dtype=torch.bool, device=device)
    for row, context in enumerate(contexts):
        seen[row, torch.tensor(context, device=device)] = True
    return seen


# --- 4. sampling a batch, one step at a time --------------------------------------------------------


class Generation:
    """A batch of prompts (token ids, any lengths) continued one token per ``step()``.

    This is the loop behind ``generate_tokens``, ``generate`` and ``stream``, and the piece a
    server drives: a row ends at ``<|endoftext|>`` (if ``cfg.stop_at_eot``; the token is not kept),
    after ``cfg.max_new_tokens`` tokens, or when the caller calls ``finish(row)`` (a stop string).
    Finished rows leave the batch, so they cost nothing afterwards. It samples (or decodes greedily
    at temperature 0); ``cfg.beams`` is for ``beam_search``.
    """

    def __init__(self, model, prompt_ids: list[list[int]], cfg: SamplingConfig, eot_id: int | None = None,
                 *, path: Path = "fast") -> None:
        cfg.validate()
        if not prompt_ids:
            raise SlmError("no prompts given")
        self.cfg, self.eot_id = cfg, eot_id
        contexts = [fit_context(ids, model.config.block_size, eot_id) for ids in prompt_ids]
        self.tokens: list[list[int]] = [[] for _ in contexts]  # the new tokens of each row
        self.done = [False] * len(contexts)
        self._rows = list(range(len(contexts)))  # the prompt index of each live row
        device, _ = _device_dtype(model)
        self._generator = make_generator(cfg.seed, device)
        with torch.inference_mode():
            self._runner = make_runner(path, model, contexts, cfg.max_new_tokens)
            self._seen = None
            if cfg.repetition_penalty != 1.0:
                self._seen = _seen_mask(contexts, self._runner.logits.size(-1), device)

    @property
    def finished(self) -> bool:
        return all(self.done)

    def finish(self, row: int) -> None:
        """End row ``row`` now (it leaves the batch at the next step)."""
        self.done[row] = True

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        """Pick one token for every live row; return ``{row: token}`` for the tokens kept."""
        self._drop_finished()
        if not self._rows:
            return {}
        logits = self._runner.logits
        for process in logits_pipeline(self.cfg, self._seen):
            logits = process(logits)
        picked = choose(logits, self.cfg.temperature, self._generator)
        if self._seen is not None:
            self._seen.scatter_(1, picked[:, None], True)
        tokens, out = picked.tolist(), {}
        for row, token in zip(self._rows, tokens):
            if self.cfg.stop_at_eot and token == self.eot_id:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            out[row] = token
            if len(self.tokens[row]) >= self.cfg.max_new_tokens:
                self.done[row] = True
        live = [i for i, row in enumerate(self._rows) if not self.done[row]]
        if live:  # feed the new tokens back; nothing to run once every row is done
            self._select(live)
            self._runner.advance([tokens[i] for i in live])
        return out

    def _drop_finished(self) -> None:
        live = [i for i, row in enumerate(self._rows) if not self.done[row]]
        if live and len(live) < len(self._rows):
            self._select(live)
        elif not live:
            self._rows = []

    def _select(self, live: list[int]) -> None:
        if len(live) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in live]
        self._runner.select(live)
        if self._seen is not None:
            self._seen = self._seen[torch.tensor(live, device=self._seen.device)]


def generate_tokens(model, prompt_ids: list[list[int]], cfg: SamplingConfig, eot_id: int | None = None,
                    *, path: Path = "fast") -> list[list[int]]:
    """The new tokens for each prompt (a batch of token-id lists of any lengths). Ends each row at
    ``eot_id`` (not included, when ``cfg.stop_at_eot``) or after ``cfg.max_new_tokens``; stop
    strings need text, so ``generate`` and ``stream`` apply them. ``path``: "fast" (default),
    "step", "cached" or "uncached" (the slow reference); all give the same greedy tokens, except
    that in a batch the cached paths slide every row's window together (the context rule)."""
    cfg.validate()
    if not prompt_ids:
        return []
    if cfg.beams > 1:
        return [beam_search(model, ids, cfg, eot_id, path=path) for ids in prompt_ids]
    gen = Generation(model, prompt_ids, cfg, eot_id, path=path)
    while not gen.finished:
        gen.step()
    return gen.tokens


# --- 5. beam search -------------------------------------------------------------------------------


@torch.inference_mode()
def beam_search(model, prompt_ids: list[int], cfg: SamplingConfig, eot_id: int | None = None, *,
                is_finished: Callable[[list[int]], bool] | None = None, path: Path = "fast") -> list[int]:
    """The most likely continuation of one prompt, by beam search with ``cfg.beams`` beams.

    Hugging Face's beam search (``generate(num_beams=N, do_sample=False)`` with its default
    ``early_stopping=False``), step for step:

    * A beam's score is the sum of its tokens' log-probabilities. The repetition penalty acts on
      each step's log-probabilities (all <= 0, so a seen token's is multiplied by the penalty),
      not on the logits before the softmax.
    * Each step takes the ``2 * beams`` best extensions of all beams. A candidate is finished at
      ``<|endoftext|>`` (when ``cfg.stop_at_eot``; not included), when ``is_finished(tokens)``
      is true (``generate`` passes the stop strings), or at ``max_new_tokens``; only the
      ``beams`` best candidates may finish (the rest are spares), and the best unfinished ones go
      on as the new beams.
    * Finished hypotheses are ranked by score / length ** ``length_penalty`` (the length counts
      the end token: > 1 favours longer, < 1 shorter), and the ``beams`` best are kept.
    * The search ends when ``beams`` hypotheses are finished and the best live beam, at its
      current length, scores no better than the worst of them.

    Deterministic: temperature, top-k, top-p, min-p and the seed do not apply.
    """
    cfg.validate()
    n, lp = cfg.beams, cfg.length_penalty
    device, _ = _device_dtype(model)
    context = fit_context(prompt_ids, model.config.block_size, eot_id)
    runner = make_runner(path, model, [context], cfg.max_new_tokens)
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1, device=device)  # sum of log-probs of each live beam
    seen = _seen_mask([context], runner.logits.size(-1), device) if cfg.repetition_penalty != 1.0 else None
    finished: list[tuple[float, list[int]]] = []  # the n best (normalized score, tokens), best first

    for step in range(1, cfg.max_new_tokens + 1):
        logprobs = runner.logits.log_softmax(dim=-1)
        if seen is not None:  # after the softmax, as Hugging Face's beam search runs its processors
            logprobs = apply_repetition_penalty(logprobs, seen, cfg.repetition_penalty)
        candidates = scores[:, None] + logprobs  # (beams, vocab)
        vocab = candidates.size(-1)
        top, flat = candidates.view(-1).topk(min(2 * n, candidates.numel()))
        rows, tokens, new_scores, new_beams = [], [], [], []
        for rank, (score, index) in enumerate(zip(top.tolist(), flat.tolist())):
            if score == -math.inf:
                break
            row, token = divmod(index, vocab)
            at_eot = cfg.stop_at_eot and token == eot_id
            sequence = beams[row] if at_eot else beams[row] + [token]
            if at_eot or step == cfg.max_new_tokens or (is_finished is not None and is_finished(sequence)):
                if rank < n:  # lower ones are spares, there only so that n beams can go on
                    finished.append((score / step**lp, sequence))
            elif len(new_beams) < n:
                rows.append(row)
                tokens.append(token)
                new_scores.append(score)
                new_beams.append(sequence)
        finished = sorted(finished, key=lambda f: f[0], reverse=True)[:n]
        if not new_beams:  # the last step, or every candidate finished
            break
        if len(finished) == n and max(new_scores) / step**lp <= finished[-1][0]:
            break  # Hugging Face's stopping rule: the live beams are taken to be unable to win
        beams, scores = new_beams, torch.tensor(new_scores, device=device)
        runner.select(rows)
        runner.advance(tokens)
        if seen is not None:
            seen = seen[torch.tensor(rows, device=device)]
            seen[torch.arange(len(rows), device=device), torch.tensor(tokens, device=device)] = True
    return finished[0][1] if finished else []


# --- 6. text --------------------------------------------------------------------------------------


class TextStream:
    """Token ids in, printable text pieces out, for showing text while it is generated.

    A token may end in the middle of a UTF-8 character: bytes are decoded incrementally, so an
    incomplete character waits for the token that completes it. Text that could be the beginning
    of a stop string is held back until it is clear; at a stop string the text is cut right before
    it and ``stopped`` becomes true.
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stops = [s for s in stop if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to show (often "")."""
        if self.stopped:
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


def _beam_text(model, tokenizer, prompt: str, cfg: SamplingConfig) -> str:
    def hits_stop(tokens: list[int]) -> bool:
        return _cut_at_stop(tokenizer.decode(tokens), cfg.stop)[1]

    tokens = beam_search(model, tokenizer.encode(prompt), cfg, tokenizer.eot_id,
                         is_finished=hits_stop if cfg.stop else None)
    return _cut_at_stop(tokenizer.decode(tokens), cfg.stop)[0]


def generate(model, tokenizer, prompts: list[str], cfg: SamplingConfig) -> list[str]:
    """Continue each prompt (in one batch); return the completions only, without the prompts,
    cut before the first stop string."""
    cfg.validate()
    if not prompts:
        return []
    if cfg.beams > 1:
        return [_beam_text(model, tokenizer, p, cfg) for p in prompts]
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
    cfg.validate()
    if cfg.beams > 1:
        yield _beam_text(model, tokenizer, prompt, cfg)
        return
    gen = Generation(model, [tokenizer.encode(prompt)], cfg, tokenizer.eot_id)
    text = TextStream(tokenizer, cfg.stop)
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


# --- 7. CLI ---------------------------------------------------------------------------------------


def _unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` typed on the command line, as the characters."""
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    d = SamplingConfig()
    parser.add_argument("run_dir", help="RUN_DIR written by slm train")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens to generate at most (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy; higher = more random (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="sample among the k most likely tokens; 0 = off (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="nucleus: smallest set with this much probability; 1 = off (default %(default)s)")
    parser.add_argument("--min-p", type=float, default=d.min_p, help="drop tokens below min-p x the top probability; 0 = off (default %(default)s)")
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                        help="> 1 discourages tokens already in the context; 1 = off (default %(default)s)")
    parser.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR",
                        help="end at the first of these strings (\\n and \\t understood)")
    parser.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>: run on to --max-new-tokens")
    parser.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    parser.add_argument("--beams", type=int, default=d.beams, help="beam search with N beams: the most likely text, not a sample")
    parser.add_argument("--length-penalty", type=float, default=d.length_penalty,
                        help="beam search: > 1 favours longer texts, < 1 shorter (default %(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run (default auto)")
    parser.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint: best validation loss or last (default best)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: PyTorch's choice); on a busy machine 1 is often fastest for one prompt")


def _sampling_config(args: argparse.Namespace) -> SamplingConfig:
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        stop=[_unescape(s) for s in args.stop], stop_at_eot=not args.no_stop, seed=args.seed,
        beams=args.beams, length_penalty=args.length_penalty,
    )
    cfg.validate()
    return cfg


def _load(args: argparse.Namespace):
    from slmkit.checkpoint import load_run

    if args.threads is not None:
        if args.threads < 1:
            raise SlmError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_run(args.run_dir, device=resolve_device(args.device), which=args.which)
    return model, tokenizer


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="", help="text to continue ('-' reads stdin; default: a new document)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples of the prompt, generated as one batch (default 1)")
    _add_common_arguments(parser)


def _report(tokens: int, seconds: float) -> None:
    if sys.stderr.isatty():
        print(f"[{tokens} tokens in {seconds:.1f}s, {tokens / max(seconds, 1e-9):.0f} tokens/s]", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    """``slm generate``: print the prompt and its continuation as it is produced. With
    ``--num-samples N`` the samples are generated as one batch (N times the throughput) and each
    is printed, in order, as soon as it is complete, with a ``---`` line between samples."""
    cfg = _sampling_config(args)
    if args.num_samples < 1:
        raise SlmError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.num_samples > 1 and cfg.beams > 1:
        raise SlmError("beam search gives one answer: use --num-samples 1 with --beams")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = _load(args)
    out, t0 = sys.stdout, time.perf_counter()
    if args.num_samples == 1:
        out.write(prompt)
        out.flush()
        pieces = []
        for piece in stream(model, tokenizer, prompt, cfg):
            out.write(piece)
            out.flush()
            pieces.append(piece)
        out.write("\n")
        _report(len(tokenizer.encode("".join(pieces))), time.perf_counter() - t0)
        return 0
    gen = Generation(model, [tokenizer.encode(prompt)] * args.num_samples, cfg, tokenizer.eot_id)
    texts = [TextStream(tokenizer, cfg.stop) for _ in range(args.num_samples)]
    pieces: list[list[str]] = [[] for _ in range(args.num_samples)]
    printed = 0
    while printed < args.num_samples:
        for row, token in gen.step().items():
            pieces[row].append(texts[row].push(token))
            if texts[row].stopped:
                gen.finish(row)
        while printed < args.num_samples and gen.done[printed]:
            if printed:
                out.write("---\n")
            out.write(prompt + "".join(pieces[printed]) + texts[printed].finish() + "\n")
            out.flush()
            printed += 1
    _report(sum(len(t) for t in gen.tokens), time.perf_counter() - t0)
    return 0


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-history", action="store_true", help="continue each line on its own, not the whole transcript")
    _add_common_arguments(parser)


CHAT_HELP = ("Type text and the model continues it; the conversation so far is the context. "
             "Empty line: continue. /reset: start over. /quit or Ctrl-D: leave. Ctrl-C: stop a reply.")


def run_chat(args: argparse.Namespace) -> int:
    """``slm chat``: an interactive loop for a base model. Each line you type is added to a
    rolling transcript (the last ``block_size`` tokens are what the model sees) and the model's
    continuation is streamed and added too; ``--no-history`` continues each line on its own."""
    cfg = _sampling_config(args)
    model, tokenizer = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    transcript, max_chars = "", 8 * model.config.block_size  # far more text than the context holds
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, like a shell
            print()
            continue
        command = line.strip()
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            transcript = ""
            continue
        if args.no_history:
            transcript = ""
        transcript = (transcript + ("\n" if transcript and line else "") + line)[-max_chars:]
        pieces = []
        try:
            with warnings.catch_warnings():  # the transcript outgrowing the context is expected
                warnings.simplefilter("ignore")
                for piece in stream(model, tokenizer, transcript, cfg):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    pieces.append(piece)
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        transcript += "".join(pieces)

"""Continuous batching: sequences join a running batch between decode steps and leave it when done.

``Generation`` continues a fixed batch of prompts; a server gets new prompts all the time. Here
each ``Seq`` (one prompt and how to sample it) is prefilled in chunks of at most
``prefill_chunk`` tokens per ``step()`` so the rows already running are never held up by a long
prompt for more than one chunk (waiting prompts of the same length that fit a chunk whole go
through one forward pass together: all of them while no row runs), and then joins the running batch's KV cache (``KVCache.admit``
lines its last token up with the batch's last slot; its positions still count from its own first
token, and the mask hides the other rows' slots). Every ``step()`` picks one token for every
running row and runs one decode step over all of them. A finished or cancelled row leaves a hole:
its row of the cache stays until a new sequence takes it (``KVCache.fill``: a copy of that row's
slots), so rows that come and go do not copy the whole cache each time. A decoder that skips holes
(``skips_rows``) keeps them so, dropping only those after the last running row; with others,
which run holes along (output unused), holes still empty after ``hole_steps`` steps are closed up
(the last rows move into them). When the cache's slots run out it closes up too
(``KVCache.compact``: the slots left of every row's start are dropped).

While rows run, a waiting prompt of at most ``ride`` tokens is not prefilled at all: it joins the
batch at once with no slots and rides its decode steps, fed one prompt token a step, its logits
unused until its last prompt token (``_ride_in``). A decode step reads every weight once for all
its rows, so on a CPU a prompt token costs far less there than in a forward pass of its own, and
the running rows never wait on one. A prompt of at most ``ride_idle`` tokens rides an idle
batch's steps too (from an empty cache) instead of a prefill pass: for a decoder whose step of
one row costs less than a forward pass's fixed cost plus a token's share (the C++ step on a CPU).
A decoder that ``feeds_many`` (the C++ step) takes a riding prompt's tokens in its first step
rather than one a step, the others as extra rows of that step before the row's own token, the
same bits either way: as many as fit before the batch's next slot, at most ``prefill_chunk`` a
step into a running batch (a prompt past that waits a step), all of them into an idle one.

With a ``PrefixCache`` handed in, a new sequence starts with the keys and values of its longest
cached prefix (at most all its prompt tokens but the last, which must run for its logits) and runs
only the rest of its prompt: a riding row joins with those slots already filled (at the right end of
the cache, as ``KVCache.fill`` and ``admit`` line rows up), a prefilled one gets a cache seeded with
them. Every prompt run to its end is inserted (copied out of the cache it ran in). Prompts scored
with ``prompt_logprobs`` run whole: they need every position's logits and a float32 cache.

Each row samples with its own ``SamplingConfig`` through the same processors as ``Generation``
(``logits_pipeline`` and ``choose``) and its own seeded ``torch.Generator``, plus OpenAI's
``logit_bias``, presence / frequency penalties and ``min_tokens``; so a row's tokens do not depend
on what else is in the batch (greedy rows: the same as a batch of one, tested). A row must fit the
context: prompt + ``max_new_tokens`` <= ``block_size`` (no window sliding here); a prompt only
scored (``max_new_tokens=0``) may be ``block_size + 1`` tokens, its last one only a target.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from slmkit.decode import Decoder, KVCache, make_decoder
from slmkit.generate.prefix import PrefixCache
from slmkit.generate.runners import DECODERS, Path
from slmkit.generate.sampling import (
    SamplingConfig, _seen_mask, apply_ban, apply_logit_bias, apply_presence_frequency, choose, logits_pipeline,
    make_generator, native_sampling, native_top_p,
)


@dataclass(eq=False)
class Seq:
    """One prompt to continue and how; ``ContinuousBatch`` fills in the results as it goes.

    ``max_new_tokens`` may be 0 (only the prompt is scored: ``prompt_logprobs``). A row ends at
    ``end_ids`` (not kept; ``<|endoftext|>`` when ``cfg.stop_at_eot``, a chat template's end token),
    never before ``min_tokens`` tokens, or after ``max_new_tokens``. ``logprobs``: None, or how many
    of the most likely tokens to report with each chosen token's log-probability (0: only it)."""

    prompt: list[int]
    cfg: SamplingConfig
    max_new_tokens: int
    end_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    prompt_logprobs: bool = False
    # results
    tokens: list[int] = field(default_factory=list, init=False)
    token_logprobs: list[float] = field(default_factory=list, init=False)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list, init=False)
    prompt_token_logprobs: list[float | None] = field(default_factory=list, init=False)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list, init=False)
    finish_reason: str | None = field(default=None, init=False)  # "stop", "length" or "cancelled"
    cancelled: bool = field(default=False, init=False)  # set from any thread: leaves at the next step

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _report(logprobs: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the ``k`` most likely (id, log-probability)."""
    top = []
    if k:
        values, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), values.tolist()))
    return float(logprobs[token]), top


@contextmanager
def _serial() -> Iterator[None]:
    """PyTorch on one thread inside: for the small copies of joining rows and the prefix cache.
    A copy of more than ~32k elements runs on OpenMP's threads, which then spin-wait for more work
    (for a while) on the cores the C++ decode step's own threads run on next: with prefix-cache
    copies between steps, 16 rows' steps took ~10% longer (p90 1.8 ms instead of 1.1 ms)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Row:
    """A running row's sampling state: its generator, the seen mask and the generated counts."""

    def __init__(self, seq: Seq, vocab: int, device: torch.device) -> None:
        self.seq = seq
        self.generator = make_generator(seq.cfg.seed, device)
        self.seen = _seen_mask([seq.prompt], vocab, device) if seq.cfg.repetition_penalty != 1.0 else None
        penalised = seq.presence_penalty or seq.frequency_penalty
        self.counts = torch.zeros(1, vocab, device=device) if penalised else None
        self.bias = None
        if seq.logit_bias:
            ids = torch.tensor(list(seq.logit_bias), device=device)
            self.bias = (ids, torch.tensor(list(seq.logit_bias.values()), device=device))
        self.ends = torch.tensor(seq.end_ids, device=device, dtype=torch.long) if seq.end_ids else None
        self.tracks = self.seen is not None or self.counts is not None  # saw() has something to do
        self.pipeline = logits_pipeline(seq.cfg, self.seen)
        # No state of its own beyond the generator: rows with the same settings are processed together
        # (greedy ones by the batch's argmax).
        self.stateless = self.bias is None and self.counts is None and self.seen is None and not seq.min_tokens
        self.plain_greedy = self.stateless and seq.cfg.temperature == 0
        c = seq.cfg
        self.group = (c.temperature, c.top_k, c.top_p, c.min_p) if self.stateless else None
        # Nucleus sampling alone draws in C++ (native_top_p) from numbers its generator gives ahead,
        # all at once: the same numbers as one draw per step (tested), without a PyTorch call a step.
        self.uniforms: list[float] | None = None
        if self.stateless and c.temperature > 0 and not c.top_k and not c.min_p and c.top_p < 1 \
                and native_sampling(device):
            self.uniforms = torch.rand(seq.max_new_tokens, generator=self.generator, dtype=torch.float64).tolist()
        self.draws = 0
        self.feed: deque[int] = deque()  # prompt tokens still to feed through decode steps (a riding prompt)
        self.extra: list[int] = []  # prompt tokens its next step feeds before its token (Decoder.feeds_many)
        self.remember = False  # insert the prompt into the prefix cache once fed (see _remember_ridden)

    def pick(self, logits: torch.Tensor) -> int:
        """This row's next token from its next-token logits (1, vocab)."""
        seq = self.seq
        if self.bias is not None:
            logits = apply_logit_bias(logits, *self.bias)
        if self.counts is not None:
            logits = apply_presence_frequency(logits, self.counts, seq.presence_penalty, seq.frequency_penalty)
        if self.ends is not None and len(seq.tokens) < seq.min_tokens:
            logits = apply_ban(logits, self.ends)
        for process in self.pipeline:
            logits = process(logits)
        return int(choose(logits, seq.cfg.temperature, self.generator))

    def saw(self, token: int) -> None:
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1


class ContinuousBatch:
    """Sequences continued together, joining and leaving between steps (see the module docstring).

    ``add(seq)`` queues a sequence; each ``step()`` decodes one token for every running row and
    prefills up to ``prefill_chunk`` prompt tokens of the waiting ones (at most ``max_batch`` rows
    run at once); it returns the sequences that changed. Not thread-safe, except ``seq.cancelled``.
    ``decoder`` (default: ``make_decoder(model, path)``) runs the prefills and steps; prompts scored
    with ``prompt_logprobs`` run through ``model`` itself. ``sample_threads``: the threads of the
    rows sampled in one C++ call (``native_top_p``; None: PyTorch's), which change no token.
    ``ride`` and ``ride_idle``: see the module docstring."""

    def __init__(self, model, *, max_batch: int = 16, prefill_chunk: int = 64, path: Path | str = "fast",
                 hole_steps: int = 8, ride: int = 64, kv_dtype: torch.dtype | None = None,
                 prefixes: PrefixCache | None = None, decoder: Decoder | None = None,
                 sample_threads: int | None = None, ride_idle: int = 0) -> None:
        if max_batch < 1 or prefill_chunk < 1 or hole_steps < 0 or ride < 0 or ride_idle < 0:
            raise ValueError("max_batch and prefill_chunk must be at least 1, hole_steps, ride and ride_idle at least 0")
        self.model, self.max_batch, self.prefill_chunk, self.hole_steps = model, max_batch, prefill_chunk, hole_steps
        self.ride, self.ride_idle, self.prefixes, self.sample_threads = ride, ride_idle, prefixes, sample_threads
        self.block_size = model.config.block_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.vocab = model.config.vocab_size
        self.decoder = decoder if decoder is not None else make_decoder(model, DECODERS.get(path, path))
        # the KV caches' element type: the model's, or kv_dtype where the decoder's steps read it
        # (NativeDecoder: bf16, half the bytes its attention reads per step)
        self.kv_dtype = self.dtype
        if kv_dtype is not None and kv_dtype != self.dtype:
            if kv_dtype not in self.decoder.kv_dtypes:
                raise ValueError(f"the {self.decoder.name!r} decoder reads {str(self.dtype).removeprefix('torch.')} "
                                 f"KV caches, not {str(kv_dtype).removeprefix('torch.')}")
            self.kv_dtype = kv_dtype
        self.waiting: deque[Seq] = deque()
        self.rows: list[_Row | None] = []  # the cache's rows in order: a running row, or None (a hole)
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # (cache rows, vocab) next-token logits (a hole's unused)
        self._holes: dict[int, int] = {}  # hole -> the step it opened at
        self._steps = 0
        self._prefill: tuple[Seq, KVCache, int] | None = None  # the sequence being prefilled, its cache, tokens done
        self._extras_left: int | None = None  # riders' extra tokens the next step may still take (None: any)
        self._gone: list[Seq] = []  # sequences changed during this step
        # rows joining one by one land in room kept for them, not in a copy of the whole cache
        # each time (KVCache.admit), where the decoder's steps read such a cache
        self._room = max_batch if self.decoder.strided_kv else 0
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None  # the last cache's buffers of room rows

    def add(self, seq: Seq) -> None:
        """Queue ``seq``; ValueError if it does not fit the context or has no prompt."""
        if not seq.prompt:
            raise ValueError("empty prompt: start it with <|endoftext|>")
        if len(seq.prompt) + seq.max_new_tokens > self.block_size + (seq.max_new_tokens == 0):
            raise ValueError(f"{len(seq.prompt)} prompt + {seq.max_new_tokens} new tokens do not fit the context "
                             f"of {self.block_size} tokens")
        if seq.max_new_tokens < 0 or seq.logit_bias and not all(0 <= i < self.vocab for i in seq.logit_bias):
            raise ValueError("max_new_tokens must be >= 0 and logit_bias ids in the vocabulary")
        seq.cfg.validate()
        self.waiting.append(seq)

    @property
    def running(self) -> int:
        """Sequences in the decode batch."""
        return len(self.rows) - len(self._holes)

    @property
    def load(self) -> int:
        """Sequences held: running, being prefilled and waiting."""
        return self.running + len(self.waiting) + (self._prefill is not None)

    @property
    def idle(self) -> bool:
        return self.load == 0

    def finish(self, seq: Seq, reason: str = "stop") -> None:
        """End ``seq`` now (a stop string); it leaves the batch at the next step."""
        if not seq.done:
            seq.finish_reason = reason

    @torch.inference_mode()
    def step(self) -> list[Seq]:
        """One decode step for the running rows, then up to ``prefill_chunk`` prompt tokens."""
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self.finish(seq, "cancelled")
            self._gone.append(seq)
        self._steps += 1
        self._leave()
        if self.running:
            self._decode()
            self._remember_ridden()
        self._prefill_some()
        self._close_holes()
        changed, self._gone = self._gone, []
        return changed

    # --- decoding ---------------------------------------------------------------------------------

    def _leave(self) -> None:
        """Finished and cancelled rows become holes; with none running, the cache goes."""
        for i, row in enumerate(self.rows):
            if row is None:
                continue
            if row.seq.cancelled and not row.seq.done:
                self.finish(row.seq, "cancelled")
                self._gone.append(row.seq)
            if row.seq.done:
                self.rows[i] = None
                self._holes[i] = self._steps
                self.cache.start[i] = self.cache.length  # from now on it attends to its own new slots only
        if self.rows and not self.running:
            # the buffers stay for the next rows: allocated anew, their pages would fault again, one
            # by one as the step's keys and values reach them
            # (a batch that never grew past its first cache has none: the ones kept stay)
            self._spare = (self.cache.spare_buffers() if self._room else None) or self._spare
            self.rows, self.cache, self.logits, self._holes = [], None, None, {}

    def _close_holes(self) -> None:
        """Drop the holes once one has waited ``hole_steps`` steps for a sequence: the last rows move
        into them, so a cache with room copies only those rows (``KVCache.reorder``), not every row.
        A decoder that skips holes (``skips_rows``: they cost its step nothing) keeps them for the
        sequences to come, and only the holes after the last running row go, which moves no row:
        moving rows into holes near the end of a burst copied rows about to end too (at 64
        clients 18 ms a time, a tenth of the engine's time)."""
        if not self._holes:
            return
        if self.decoder.skips_rows:
            n = len(self.rows)
            while n and self.rows[n - 1] is None:
                n -= 1
            if n < len(self.rows):
                self.cache.reorder(torch.arange(n, device=self.device), in_place=self.decoder.strided_kv)
                self.rows, self.logits = self.rows[:n], self.logits[:n]
                self._holes = {i: at for i, at in self._holes.items() if i < n}
            return
        if self._steps - min(self._holes.values()) < self.hole_steps:
            return
        live = [i for i, row in enumerate(self.rows) if row is not None]
        order = list(range(len(live)))
        for hole, row in zip([i for i in order if self.rows[i] is None], [i for i in live if i >= len(live)]):
            order[hole] = row
        self.rows = [self.rows[i] for i in order]
        index = torch.tensor(order, device=self.device)
        self.cache.reorder(index, in_place=self.decoder.strided_kv)
        self.logits = self.logits[index]
        self._holes = {}

    def _decode(self) -> None:
        logits = self.logits
        live = [(i, row) for i, row in enumerate(self.rows) if row is not None and not row.feed]  # riding: no logits yet
        greedy = logits.argmax(-1).tolist() if any(r.plain_greedy for _, r in live) else None
        logprobs = logits.log_softmax(-1) if any(r.seq.logprobs is not None for _, r in live) else None
        picked = self._pick_groups(logits, live)
        for i, row in live:
            seq = row.seq
            token = greedy[i] if row.plain_greedy else picked[i] if i in picked else row.pick(logits[i : i + 1])
            if token in seq.end_ids and len(seq.tokens) >= seq.min_tokens:
                seq.finish_reason = "stop"
                continue
            seq.tokens.append(token)
            if seq.logprobs is not None:
                lp, top = _report(logprobs[i], token, seq.logprobs)
                seq.token_logprobs.append(lp)
                seq.top_logprobs.append(top)
            if row.tracks:
                row.saw(token)
            if len(seq.tokens) >= seq.max_new_tokens:
                seq.finish_reason = "length"
        self._gone += [row.seq for _, row in live]
        self._leave()  # the rows that ended leave holes; the others feed their new token
        if self.running:
            if self.cache.length == self.cache.max_len:
                for i in self._holes:  # a hole holds no slots: only the running rows' starts count
                    self.cache.start[i] = self.cache.length
                self.cache.compact()
            tokens = torch.tensor([0 if row is None else row.feed.popleft() if row.feed else row.seq.tokens[-1]
                                   for row in self.rows], device=self.device)
            extra = {i: row.extra for i, row in enumerate(self.rows) if row is not None and row.extra}
            # the rows whose logits the next step reads: not holes, nor riders with prompt still to feed
            need = [row is not None and not row.feed for row in self.rows]
            need = None if all(need) or not self.decoder.skips_logits else torch.tensor(need, device=self.device)
            kw = {"extra": extra} if extra else {}  # (only a decoder that feeds_many is given extras)
            if self._holes and self.decoder.skips_rows:  # a hole's row is not run (its slots are never read)
                kw["holes"] = torch.tensor([row is None for row in self.rows], device=self.device)
            self.logits = self.decoder.step(tokens, self.cache, need, **kw).float()
            for fed in extra.values():  # each row's own list (_Row.extra): fed now
                fed.clear()

    def _pick_groups(self, logits: torch.Tensor, live: list[tuple[int, _Row]]) -> dict[int, int]:
        """Tokens of the sampled rows without state of their own among ``live`` (the rows with
        logits: (index, row)), one pass of the processors per group of equal settings, each row
        drawing from its own generator: ``{row index: token}``. Groups with nucleus sampling alone
        (no top-k or min-p) draw in one C++ call (``native_top_p``)."""
        groups: dict[tuple, list[int]] = {}
        for i, row in live:
            if row.group is not None and not row.plain_greedy:
                groups.setdefault(row.group, []).append(i)
        picked: dict[int, int] = {}
        for (temperature, _, top_p, _), rows in groups.items():
            if self.rows[rows[0]].uniforms is not None:  # the group's rows all have them (same settings)
                u = []
                for i in rows:
                    row = self.rows[i]
                    u.append(row.uniforms[row.draws])
                    row.draws += 1
                if not logits.is_contiguous():
                    logits = logits.contiguous()
                tokens = native_top_p(logits, temperature, top_p, u, rows, self.sample_threads)
                assert tokens is not None, "the rows were given uniforms for native_top_p: it must run"
                picked.update(zip(rows, tokens))
                continue
            if len(rows) == 1:
                continue  # row.pick does the same
            x = logits[rows]
            for process in self.rows[rows[0]].pipeline:
                x = process(x)
            tokens = choose(x, self.rows[rows[0]].seq.cfg.temperature, [self.rows[i].generator for i in rows])
            picked.update(zip(rows, tokens.tolist()))
        return picked

    # --- prefilling -------------------------------------------------------------------------------

    def _prefill_some(self) -> None:
        budget, changed = self.prefill_chunk, self._gone
        # riders' extra tokens for the next step (_ride_in): prefill_chunk while rows run; no cap
        # for an idle batch (nobody's step to hold up)
        self._extras_left = self.prefill_chunk if self.rows else None
        while budget > 0:
            if self._prefill is None:
                while self.waiting and self.waiting[0].cancelled:
                    seq = self.waiting.popleft()
                    self.finish(seq, "cancelled")
                    changed.append(seq)
                if self._ride_limit() and self._ride_in():
                    break  # the next waiting prompt rides in next step
                if not self.waiting or self.running >= self.max_batch:
                    break
                used = self._prefill_together(budget)
                if used:
                    budget -= used
                    continue
                seq = self.waiting.popleft()
                if seq.prompt_logprobs or not seq.max_new_tokens:  # scored: run whole, nothing to reuse for
                    # a scored prompt's log-probabilities are the model's (slm eval's): its prefill keeps
                    # float32 keys and values; joining the batch rounds them into its cache (fill, admit)
                    cache = KVCache.empty(self.model.config, 1, max_len=self.block_size, device=self.device,
                                          dtype=self.dtype if seq.prompt_logprobs else self.kv_dtype)
                    self._prefill = (seq, cache, 0)
                else:
                    cache = self._seeded([self._lookup(seq)], self.block_size)
                    self._prefill = (seq, cache, cache.length)
            seq, cache, done = self._prefill
            if seq.cancelled:
                self._prefill = None
                self.finish(seq, "cancelled")
                changed.append(seq)
                continue
            todo = self._to_run(seq)
            if not todo:  # a one-token prompt to score: nothing predicts it
                self._prefill = None
                seq.prompt_token_logprobs, seq.prompt_top_logprobs = [None], [None]
                seq.finish_reason = "length"
                changed.append(seq)
                continue
            n = min(budget, todo - done)
            ids = torch.tensor([seq.prompt[done : done + n]], device=self.device)
            if seq.prompt_logprobs:
                logits = self.model(ids, cache=cache)[0][0].float()  # (n, vocab): every position
                self._score_prompt(seq, logits, done)
                last = logits[-1:]
            else:
                last = self.decoder.prefill(ids, cache).float()
            budget -= n
            done += n
            if done < todo:
                self._prefill = (seq, cache, done)
                continue
            self._prefill = None
            changed.append(seq)
            if seq.max_new_tokens == 0:
                seq.finish_reason = "length"
                continue
            if not seq.prompt_logprobs:
                self._remember(seq, cache, 0)
            self._join(seq, cache, last)

    def _ride_in(self) -> bool:
        """Waiting prompts of at most ``ride`` tokens (past their cached prefix) join the running
        batch at once, with no slots yet but their cached prefix's, and are fed through its decode
        steps one token a step (``_Row.feed``), their logits unused until the last prompt token: a
        decode step reads every weight once for all its rows, so a prompt token costs a row of a
        step instead of a prefill forward pass, and nobody waits on a pass. Into holes first, the
        rest appended together (one copy of the cache), the copies on one thread (``_serial``).
        With no batch running, prompts of at most ``ride_idle`` tokens ride, and are the batch.
        A decoder that ``feeds_many`` takes a rider's prompt in its first step, as many of the
        tokens as fit before the batch's next slot (all of them into an idle batch; ``_Row.extra``):
        its cached prefix is lined up to end that many slots early, the rest ride one a step. Into
        a running batch at most ``prefill_chunk`` such tokens a step (``_extras_left``, however many
        times a step this runs), as a prefill's chunk, so the running rows' step is held up by that
        much at most: a prompt past that waits a step (True: the first waiting prompt does, and is
        not to be prefilled meanwhile)."""
        limit = self._ride_limit()
        many = self.decoder.feeds_many
        budget = self._extras_left  # None: no cap

        def extras(row: _Row, p: int, room: int) -> int:
            """Tokens of ``row``'s prompt its first step feeds before its own (a prefix of ``p``, ``room``
            slots before the next one, within this step's budget), taken from its feed."""
            nonlocal budget
            n = max(0, min(len(row.feed) - 1, room - p)) if many else 0
            if budget is not None:
                n = min(n, budget)
                budget -= n
            row.extra = [row.feed.popleft() for _ in range(n)]
            return n

        waits = False
        with _serial():
            riders = []
            while self.waiting and self.running + len(riders) < self.max_batch:
                seq = self.waiting[0]
                uncached = self._uncached(seq)
                if seq.cancelled or seq.prompt_logprobs or not seq.max_new_tokens or uncached > limit:
                    break
                if many and budget is not None and uncached - 1 > budget and budget < self.prefill_chunk:
                    waits = True  # this step's extra tokens are spent: it rides in whole next step
                    break
                self.waiting.popleft()
                found = self._lookup(seq)
                row = _Row(seq, self.vocab, self.device)
                row.feed.extend(seq.prompt[found[0] :])  # a cached prefix's slots come filled (none: none)
                row.remember = self.prefixes is not None
                if self._holes:
                    i = min(self._holes, key=self._holes.get)
                    del self._holes[i]
                    gap = extras(row, found[0], self.cache.length)
                    # its own slots (and the extras' to come) end at the cache's last
                    self.cache.fill(i, self._seeded([found], found[0] + gap, [gap]))
                    self.rows[i] = row
                else:
                    room = self.block_size if self.cache is None else self.cache.length
                    riders.append((row, found, extras(row, found[0], room)))
            if riders:
                n = len(riders)
                found, gaps = [found for _, found, _ in riders], [gap for _, _, gap in riders]
                if self.cache is None:  # an idle batch: the riders are all of it
                    self.cache = self._seeded(found, self.block_size, gaps)
                    self.logits = torch.zeros(n, self.vocab, device=self.device)
                else:
                    seeded = self._seeded(found, max(p + gap for (p, _, _), gap in zip(found, gaps)), gaps)
                    self._admit(seeded)
                    self.logits = torch.cat((self.logits, self.logits.new_zeros(n, self.vocab)))
                self.rows += [row for row, _, _ in riders]
        self._extras_left = budget
        return waits

    def _ride_limit(self) -> int:
        """Uncached prompt tokens up to which a waiting prompt rides: ``ride`` while rows run, at
        most ``ride_idle`` into an idle batch."""
        return self.ride if self.rows else min(self.ride, self.ride_idle)

    def _prefill_together(self, budget: int) -> int:
        """Prefill the first waiting prompt with the others of the same length in one forward pass
        (bigger matrix products: several short prompts cost little more than one), if it fits in
        ``budget`` tokens whole and needs no prompt log-probabilities. With no rows running nobody
        waits on the pass, so it may take as many prompts as free rows; else at most ``budget``
        tokens. The rows join the batch; returns the tokens run (0: nothing done here).

        With a prefix cache, each prompt runs the same number ``n`` of its last tokens, the rest
        from the cache: ``n`` is the most any of them has uncached (at most the first prompt's
        length), and the group is every prompt with at most ``n`` uncached of at least ``n``
        tokens. (Grouping by equal uncached lengths instead would split prompts that arrived
        together by how much of each was cached, and all but one group would ride the decode
        steps, a row of a step per token: measured slower than the pass they save.)"""
        head = self.waiting[0]
        if head.prompt_logprobs or head.max_new_tokens == 0:
            return 0
        todo = {head: self._uncached(head)}  # uncached prompt tokens of the prompts that could join
        if todo[head] > budget:
            return 0
        todo.update((s, self._uncached(s)) for s in self.waiting
                    if s is not head and not s.prompt_logprobs and s.max_new_tokens and not s.cancelled)
        n = max(r for r in todo.values() if r <= min(budget, len(head.prompt)))  # without a cache: head's length
        room = self.max_batch - self.running
        if self.running:
            room = min(room, budget // n)
        group = [s for s, r in todo.items() if r <= n <= len(s.prompt)][:room]
        for seq in group:
            self.waiting.remove(seq)
        found = [self._lookup(seq, len(seq.prompt) - n) for seq in group]
        cache = self._seeded(found, self.block_size)
        ids = torch.tensor([s.prompt[p:] for s, (p, _, _) in zip(group, found)], device=self.device)
        last = self.decoder.prefill(ids, cache).float()
        for j, seq in enumerate(group):
            self._remember(seq, cache, j)
        self._gone += group
        if self.cache is None:  # the group is the batch
            self.cache, self.logits = cache, last
            self.rows += [_Row(seq, self.vocab, self.device) for seq in group]
        else:
            for j, seq in enumerate(group):
                one = KVCache(cache.k[:, j : j + 1], cache.v[:, j : j + 1], cache.start[j : j + 1], cache.length)
                self._join(seq, one, last[j : j + 1])
        return n * len(group)

    # --- the prefix cache -----------------------------------------------------------------------

    def _uncached(self, seq: Seq) -> int:
        """Prompt tokens ``seq`` would run: those after its longest cached prefix."""
        return len(seq.prompt) - (self.prefixes.match(seq.prompt) if self.prefixes is not None else 0)

    def _lookup(self, seq: Seq, limit: int | None = None) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """``seq``'s longest cached prefix (at most ``limit`` tokens) and its keys and values:
        ``(p, k, v)``, (0, None, None) for none."""
        if self.prefixes is None:
            return 0, None, None
        with _serial():
            return self.prefixes.lookup(seq.prompt, limit)

    def _seeded(self, found: list[tuple[int, torch.Tensor | None, torch.Tensor | None]], max_len: int,
                gaps: list[int] | None = None) -> KVCache:
        """A cache of one row per ``(p, k, v)`` in ``found``, each row's ``p`` slots of keys and values
        ending at slot ``P = max p`` (left-padded, as ``admit`` lines rows up): ``length`` is P.
        ``gaps``: row j's slots end ``gaps[j]`` slots early instead (left for its extra tokens), and
        P is the most ``p + gap``."""
        gaps = gaps or [0] * len(found)
        length = max(p + gap for (p, _, _), gap in zip(found, gaps))
        start = torch.tensor([length - gap - p for (p, _, _), gap in zip(found, gaps)])
        with _serial():
            cache = KVCache.empty(self.model.config, len(found), start=start, max_len=max(max_len, 1),
                                  device=self.device, dtype=self.kv_dtype)
            for j, ((p, k, v), gap) in enumerate(zip(found, gaps)):
                if p:
                    cache.k[:, j, :, length - gap - p : length - gap] = k
                    cache.v[:, j, :, length - gap - p : length - gap] = v
        cache.length = length
        return cache

    def _remember(self, seq: Seq, cache: KVCache, row: int) -> None:
        """Insert ``seq``'s prompt, just run to its end in ``row`` of ``cache``, into the prefix cache."""
        if self.prefixes is None:
            return
        first = int(cache.start[row])
        assert cache.length - first == len(seq.prompt), "the prompt's slots end at the cache's last"
        with _serial():
            self.prefixes.insert(seq.prompt, cache.k[:, row, :, first : cache.length],
                                 cache.v[:, row, :, first : cache.length])

    def _remember_ridden(self) -> None:
        """Insert the prompts of riding rows fed their last token in this step (a row cancelled
        before that left as a hole: a part of a prompt is never inserted)."""
        if self.prefixes is None:
            return
        for i, row in enumerate(self.rows):
            if row is not None and row.remember and not row.feed:
                row.remember = False
                self._remember(row.seq, self.cache, i)

    @staticmethod
    def _to_run(seq: Seq) -> int:
        """Prompt tokens to run through the model: all of them, but only to score a prompt the last
        one is a target only (so a scored text may be one token longer than the context, as each
        of ``slm eval``'s windows is)."""
        return len(seq.prompt) - (seq.max_new_tokens == 0)

    def _score_prompt(self, seq: Seq, logits: torch.Tensor, done: int) -> None:
        """Log-probabilities of prompt tokens ``done + 1 ...`` from the logits of positions ``done ...``."""
        if done == 0:
            seq.prompt_token_logprobs.append(None)
            seq.prompt_top_logprobs.append(None)
        logprobs = logits.log_softmax(-1)
        k = seq.logprobs or 0
        for i in range(logits.size(0)):
            if done + i + 1 < len(seq.prompt):
                lp, top = _report(logprobs[i], seq.prompt[done + i + 1], k)
                seq.prompt_token_logprobs.append(lp)
                seq.prompt_top_logprobs.append(top)

    def _admit(self, cache: KVCache) -> None:
        """Append ``cache``'s rows to the batch's cache (in buffers with room, the last ones if kept)."""
        spare, self._spare = self._spare, None
        self.cache.admit(cache, room=self._room, spare=spare)

    def _join(self, seq: Seq, cache: KVCache, logits: torch.Tensor) -> None:
        """The prefilled ``seq`` joins the batch: into the oldest hole, else as a new row."""
        row = _Row(seq, self.vocab, self.device)
        if self.cache is None:
            if cache.k.dtype != self.kv_dtype:  # a scored prompt's float32 cache
                cache.k, cache.v = cache.k.to(self.kv_dtype), cache.v.to(self.kv_dtype)
            self.cache, self.logits = cache, logits
            self.rows.append(row)
        elif self._holes:
            i = min(self._holes, key=self._holes.get)
            del self._holes[i]
            self.cache.fill(i, cache)
            self.logits[i] = logits[0]
            self.rows[i] = row
        else:
            self._admit(cache)
            self.logits = torch.cat((self.logits, logits))
            self.rows.append(row)

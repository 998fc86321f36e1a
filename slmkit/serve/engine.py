"""The engine: one worker thread owns the model and drives a ``ContinuousBatch``.

HTTP handlers (on the asyncio loop) ``submit`` a ``Job`` (one request: one or more ``Seq``) and read
its events from an asyncio queue; the worker admits waiting jobs between decode steps while the
batch has room, turns each new token into text (``TextStream``: whole UTF-8 characters, stop
strings held back and cut), and hands the pieces to the jobs' loop thread-safely, one hand-over per
step for all of them (waking the loop once per event cost as much as a batch row's decoding). ``Job.cancel``
(a client gone) marks its sequences; the batch drops them before its next step, so the slot is
free within one decode step. Jobs wait in a bounded queue: ``QueueFull`` when it is full.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from slmkit.decode import Decoder, NativeDecoder, placement
from slmkit.decode.native import half_weights
from slmkit.errors import SlmError
from slmkit.generate.continuous import ContinuousBatch, Seq
from slmkit.generate.prefix import PrefixCache
from slmkit.generate.text import TextStream
from slmkit.serve.metrics import Metrics

log = logging.getLogger("slmkit.serve")


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` jobs already."""


@dataclass
class Event:
    """New output of one sequence of a job: text, the token range ``tokens[start:end]`` it came
    from (``seq.tokens`` / ``seq.token_logprobs``), and the finish reason once it has ended."""

    index: int
    text: str
    start: int
    end: int
    finish_reason: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP side needs to know of the loaded model (``/v1/models``, the requests' checks),
    without the model itself (the process engine's model lives in its child process)."""

    block_size: int
    vocab_size: int
    parameters: int
    chat: bool  # the tokenizer has a chat template

    @classmethod
    def of(cls, model, tokenizer) -> ModelInfo:
        return cls(model.config.block_size, model.config.vocab_size, sum(p.numel() for p in model.parameters()),
                   tokenizer.chat_template is not None)


_job_ids = itertools.count()


class Job:
    """One request's sequences and the asyncio queue its events arrive on (``loop``: None in the
    engine's child process, where events leave through the pipe)."""

    def __init__(self, seqs: list[Seq], tokenizer, stop: list[str], loop: asyncio.AbstractEventLoop | None) -> None:
        self.id = next(_job_ids)
        self.seqs, self.loop, self.stop = seqs, loop, stop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.streams = [TextStream(tokenizer, stop) for _ in seqs]
        self.sent = [0] * len(seqs)  # tokens already turned into events
        self.pushed = [0] * len(seqs)  # tokens already turned into text (held back until sent: held)
        self.held = [""] * len(seqs)
        self.closed = [False] * len(seqs)
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancelled = False

    @property
    def finished(self) -> bool:
        return all(self.closed)

    def cancel(self) -> None:
        """Stop every sequence of the job (safe from any thread)."""
        self.cancelled = True
        for seq in self.seqs:
            seq.cancelled = True


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` where the OS shows thread names (Linux: ``top -H``, ``perf``,
    bench/serve.py's CPU per thread); Python 3.11 names only its own ``threading`` objects."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except (OSError, AttributeError):
            pass


def _deliver(pairs: list[tuple[Job, Event]]) -> None:
    """On the loop: put each event on its job's queue."""
    for job, event in pairs:
        job.events.put_nowait(event)


def _hand_over(pairs: list[tuple[Job, Event]]) -> None:
    """From the worker thread: one ``call_soon_threadsafe`` per event loop for all of ``pairs``."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
    for job, event in pairs:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, some in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, some)
        except RuntimeError:  # that loop is closed: nobody is listening
            pass


class Engine:
    """Loads the run (``load()`` returns ``(model, tokenizer)``) and serves jobs from one thread.

    The loop (``_run``) is also what the process engine's child runs (serve/process.py): it
    overrides the three places where the loop meets the outside world, ``_loaded`` (loading
    ended), ``_wait`` (block while there is nothing to do, then admit jobs) and ``_hand_over``
    (a step's events to their jobs)."""

    def __init__(self, load: Callable[[], tuple[Any, Any]], *, max_batch: int, max_queue: int, prefill_chunk: int,
                 metrics: Metrics | None = None, threads: int | None = None, kv_cache: str = "fp32",
                 prefixes: PrefixCache | None = None, weights: str = "fp32", stream_interval: int = 1) -> None:
        self._load, self.max_batch, self.max_queue, self.prefill_chunk = load, max_batch, max_queue, prefill_chunk
        # a sequence's tokens go out in events of this many (its first token and its end at once)
        self.stream_interval = stream_interval
        self.metrics = metrics or Metrics()
        self.threads = threads
        self.kv_cache = kv_cache  # "fp32" (the model's dtype) or "bf16" where the decoder reads it
        self._kv_warned = False  # the fallback from bf16 is said once
        self.weights = weights  # "fp32" (as the run holds them) or "bf16" (rounded) where the C++ step runs
        self._weights_warned = False
        self.prefixes = prefixes  # the prefix cache every batch of this engine uses (None: off)
        self.model = self.tokenizer = None
        self.info: ModelInfo | None = None  # once loaded
        self.ready = False
        self.load_error: str | None = None
        self.error: str | None = None  # why the engine stopped serving (the process engine's child died)
        self.loaded = threading.Event()  # set when loading ended, well or not
        self._pending: deque[Job] = deque()
        self._jobs: list[Job] = []  # admitted, not finished
        self._owners: dict[Seq, tuple[Job, int]] = {}  # each admitted sequence's job and index in it
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="slm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        """Queue ``job``; QueueFull when ``max_queue`` jobs are waiting already."""
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull
            self._pending.append(job)
            self.metrics.set(queue_depth=len(self._pending))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Cancel ``job`` (its client is gone): its sequences leave the batch at the next step."""
        if job.finished:
            return
        job.cancel()
        with self._cond:
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Nothing to do: each job carries its loop (the process engine receives on ``loop``)."""

    async def sync_metrics(self) -> None:
        """Bring ``metrics`` up to date (the process engine asks its child; here they are)."""
        self.metrics.set(queue_depth=self.queue_depth)

    # --- the worker -------------------------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread("slm-engine")
        try:
            if self.threads:
                torch.set_num_threads(self.threads)
            self.model, self.tokenizer = self._load()
            batch = self.new_batch()
            self.info = ModelInfo.of(self.model, self.tokenizer)
            self.ready = True
        except Exception as e:  # noqa: BLE001 - reported by the CLI as one line
            self.load_error = str(e) or type(e).__name__
        self._loaded()
        if not self.ready:
            return
        while self._wait(batch):
            try:
                changed = batch.step()
            except Exception:  # noqa: BLE001 - a bug must not take the server down: fail the jobs in flight
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail_all("internal error while generating")
                batch = self.new_batch()
                continue
            self._publish(changed)
            self.metrics.add(steps=1)
            p = self.prefixes
            cached = {} if p is None else dict(prefix_hit_tokens=p.hit_tokens, prefix_query_tokens=p.query_tokens,
                                               prefix_cache_bytes=p.nbytes)
            self.metrics.set(running=batch.running, running_requests=len(self._jobs), **cached)  # one lock a step

    def _loaded(self) -> None:
        """Loading ended (``ready`` or ``load_error``)."""
        self.loaded.set()

    def _wait(self, batch: ContinuousBatch) -> bool:
        """Block while there is nothing to do, then admit waiting jobs; False: stop."""
        with self._cond:
            while not self._stopping and batch.idle and not self._pending:
                self._cond.wait()
            if self._stopping:
                return False
            self._admit(batch)
        return True

    def _hand_over(self, pairs: list[tuple[Job, Event]]) -> None:
        """One step's events to their jobs."""
        _hand_over(pairs)

    def new_batch(self) -> ContinuousBatch:
        """A new batch as this engine steps them, once it has loaded (bench/serve.py's
        ``--engine-only`` steps one without HTTP). A prompt that fits one prefill chunk rides the
        running batch's decode steps (``ride``).
        A bf16 KV cache where the decoder reads one (the C++ step), else the model's dtype (one warning).
        The engine's prefix cache, if any, outlives a batch (a new one after a failed step).
        Its decoder: ``_decoder``."""
        decoder = self._decoder()

        def make(kv_dtype: torch.dtype | None) -> ContinuousBatch:
            # one thread samples the rows (native_top_p, ~6 us a row): the C++ step's other thread
            # sleeps between steps (rest, below), and woken to share the rows it was often
            # descheduled holding some, so the call waited on it (in the server at 16 clients: mean
            # 0.25 ms a call on two threads, 0.16 ms on one; on an idle machine one thread takes
            # 0.1 ms for 16 rows)
            return ContinuousBatch(self.model, max_batch=self.max_batch, prefill_chunk=self.prefill_chunk,
                                   ride=self.prefill_chunk, kv_dtype=kv_dtype, prefixes=self.prefixes, decoder=decoder,
                                   sample_threads=1)

        batch = None
        if self.kv_cache == "bf16":
            try:
                batch = make(torch.bfloat16)
            except ValueError as e:
                if not self._kv_warned:
                    self._kv_warned = True
                    log.warning("--kv-cache bf16 is off: %s", e)
        if batch is None:
            batch = make(None)
        if isinstance(batch.decoder, NativeDecoder):
            # between two steps this thread samples and streams while the event loop and the
            # clients want the cores: the C++ step's threads sleep at once rather than spin (16
            # clients about 5% more tokens/s, one client about 7%; bench/serve.py's loads)
            batch.decoder.rest = True
            # a short prompt rides an idle batch's steps too, all its tokens in one C++ step
            # (feeds_many): the step a prefill would run, in the batch's own cache instead of one
            # of its own copied into it (bench/first_token.py; docs/serving.md)
            batch.ride_idle = 64
        return batch

    def _decoder(self) -> Decoder | None:
        """For ``weights="bf16"`` the C++ step on the run's float32 matrices rounded to bf16
        (``native.half_weights``: bf16 products where the CPU has them; a bf16 or int8/int4 run as
        it is); where that step cannot run the model (a GPU, no C++ library), None after one
        warning. None (the batch's default, the fastest decoder) for "fp32"."""
        if self.weights != "bf16":
            return None
        why = NativeDecoder.why_not(self.model, *placement(self.model))
        if why is None:
            return NativeDecoder(self.model, weights=half_weights(self.model))
        if not self._weights_warned:
            self._weights_warned = True
            log.warning("--weights bf16 is off: the C++ decode step cannot run this model (%s); it decodes "
                        "as the run holds its weights", why)
        return None

    def _admit(self, batch: ContinuousBatch) -> None:
        if not self._pending:
            return
        while self._pending and batch.load < self.max_batch:
            job = self._pending.popleft()
            if job.cancelled:
                self.metrics.add(cancelled=1)
                continue
            self._jobs.append(job)
            self._owners.update((seq, (job, i)) for i, seq in enumerate(job.seqs))
            try:
                for seq in job.seqs:
                    batch.add(seq)
                    self.metrics.add(prompt_tokens=len(seq.prompt))
            except (ValueError, SlmError) as e:  # the protocol checks first: this is a safety net
                job.cancel()
                self._fail(job, str(e))
                self._drop_finished()
        self.metrics.set(queue_depth=len(self._pending))

    def _publish(self, changed: list[Seq]) -> None:
        """Turn the new tokens of ``changed`` into text and hand it to their jobs' loops as events:
        every step a sequence's first token and its end, else once ``stream_interval`` tokens are
        waiting. The text is made every step, so a stop string ends its row before the next step."""
        now = time.perf_counter()
        out: list[tuple[Job, Event]] = []
        generated = 0
        ended = False
        interval = self.stream_interval
        for seq in changed:
            owner = self._owners.get(seq)
            if owner is None:
                continue
            job, i = owner
            if job.closed[i]:
                continue
            start, done, end = job.sent[i], job.pushed[i], len(seq.tokens)
            stream = job.streams[i]
            if end > done:
                if end == done + 1:  # the usual case: one new token
                    job.held[i] += stream.push(seq.tokens[done])
                else:
                    job.held[i] += "".join(stream.push(t) for t in seq.tokens[done:end])
                job.pushed[i] = end
                generated += end - done
                if job.first_token_at is None:
                    job.first_token_at = now
                    self.metrics.first_token(now - job.created)
            if stream.stopped and not seq.done:
                seq.finish_reason = "stop"  # a stop string: the batch drops the row before its next step
            reason = seq.finish_reason
            if reason is None and 0 < start and end - start < interval:
                continue  # held for the next step
            text, job.held[i], job.sent[i] = job.held[i], "", end
            if reason is not None:
                text += stream.finish()
                job.closed[i] = True
                ended = True
            out.append((job, Event(i, text, start, end, reason)))
        self._hand_over(out)
        if generated:
            self.metrics.add(generation_tokens=generated)  # once per step: the counter's lock is not free
        if ended:
            self._drop_finished()

    def _drop_finished(self) -> None:
        """Forget the jobs whose sequences have all ended."""
        done = [job for job in self._jobs if job.finished]
        for job in done:
            self._jobs.remove(job)
            for seq in job.seqs:
                self._owners.pop(seq, None)
            if job.cancelled:
                self.metrics.add(cancelled=1)

    def _fail(self, job: Job, message: str) -> None:
        out = []
        for i, closed in enumerate(job.closed):
            if not closed:
                job.closed[i] = True
                out.append((job, Event(i, "", job.sent[i], job.sent[i], "error", error=message)))
        self._hand_over(out)

    def _fail_all(self, message: str) -> None:
        for job in self._jobs:
            self._fail(job, message)
        self._jobs.clear()
        self._owners.clear()

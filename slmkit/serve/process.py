"""The engine in its own process: ``ProcessEngine`` (the HTTP side's handle) and the child it starts.

With the engine's worker thread and uvicorn's event loop in one process their Python serialised on
the GIL: at 16 streaming clients on 2 cores a fifth of both cores sat idle while each thread waited
for the other, and each engine step spent ~0.26 ms outside the model waiting for the GIL. As vLLM
V1 runs its engine core in a process of its own, ``slm serve`` runs the same ``Engine`` loop
(serve/engine.py; one implementation) in a child process started with multiprocessing's spawn
context, and the HTTP process keeps Starlette, uvicorn and the tokenizer (to parse and render
prompts). They talk over one ``multiprocessing`` pipe (pickled tuples of ints, floats and strs
between our own two processes; no user file is ever unpickled):

- to the child: ``("submit", id, seqs, stop, created)``, ``("cancel", id)``, ``("metrics",)``,
  ``("stop",)``;
- to the parent: ``("loaded", ModelInfo fields)`` or ``("failed", error)`` once; then one
  ``("step", updates, waiting, received)`` per engine step for all jobs (not one per token), each
  update ``(job id, index, text, start, tokens, logprobs, top logprobs, prompt logprobs, finish
  reason, error)``; and ``("metrics", counters, waiting, received)`` answering each ``("metrics",)``.

The child turns tokens into text (``TextStream``, stop strings) as the thread engine does: a stop
string must end its row before the next step (in the parent it would take a round trip, and
tokens past it), and it is cheap where it is: measured in the child under bench/serve.py's loads,
the text pieces took ~14 us a step and the message (pickle and send) ~24 us, next to ~480 us a
step in all. The parent mirrors each request's ``Seq``s (tokens, logprobs, finish reason) from
the updates, which is what app.py reads, and receives on the event loop itself
(``loop.add_reader`` on the pipe): a reader thread handing messages to the loop competed with it
for the GIL again and cost more (3 alternating runs each of bench/serve.py --rounds 6 --clients 1
16, medians: 16 clients 11,003 tokens/s on the loop, 10,453 with a thread; one client 3,193 and
2,980). The child exits when the pipe reaches EOF (the parent died) or at ``("stop",)``; if it
dies, the jobs in flight fail with an error and ``/health`` says why.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import astuple
from multiprocessing.connection import Connection
from typing import Any

from slmkit.serve.config import ServeConfig
from slmkit.serve.engine import Engine, Event, Job, ModelInfo, QueueFull
from slmkit.serve.metrics import Metrics


class ProcessEngine:
    """The HTTP side of an ``Engine`` that runs in a child process; app.py uses it as it uses
    ``Engine`` (``submit``, ``cancel``, ``ready``, ``info``, ``tokenizer``, ``metrics``).

    ``load`` (picklable: a module-level function or a ``functools.partial`` of one) runs in the
    child and returns ``(model, tokenizer)``; ``load_tokenizer`` runs here once the child has
    loaded. ``attach(loop)`` (the app does it at startup) receives on that event loop."""

    def __init__(self, load: Callable[[], tuple[Any, Any]], load_tokenizer: Callable[[], Any], cfg: ServeConfig,
                 metrics: Metrics | None = None) -> None:
        self._load, self._load_tokenizer, self._cfg = load, load_tokenizer, cfg
        self.max_queue = cfg.max_queue
        self.metrics = metrics or Metrics()
        self.tokenizer = None
        self.info: ModelInfo | None = None
        self.ready = False
        self.load_error: str | None = None
        self.error: str | None = None  # why the engine stopped (its process died)
        self.loaded = threading.Event()  # set when loading ended, well or not
        self._jobs: dict[int, Job] = {}  # submitted, not finished or cancelled
        self._submitted = 0  # jobs sent to the child
        self._received = 0  # of those, how many the child had read at its last message
        self._waiting = 0  # jobs waiting in the child's queue at its last message
        self._scrapes: deque[asyncio.Future] = deque()  # ("metrics",) asked, not answered yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id (None before ``start``)."""
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Start the child (spawn: safe from a process with threads); it starts loading at once."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, theirs = ctx.Pipe()
        self._process = ctx.Process(target=child_main, args=(theirs, self._load, self._cfg), name="slm-engine",
                                    daemon=True)
        self._process.start()
        theirs.close()  # the child's end lives in the child only: its death is EOF here

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Receive the child's messages on ``loop`` (called on it, at the app's startup)."""
        self._loop = loop
        if self._conn is not None:
            loop.add_reader(self._conn.fileno(), self._readable)

    def stop(self) -> None:
        """Ask the child to stop and wait for it (a few seconds, then kill it)."""
        if self._process is None:
            return
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)

    # --- requests (on the event loop) ------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Send ``job`` to the child; QueueFull when ``max_queue`` jobs are waiting already."""
        if self._waiting + self._submitted - self._received >= self.max_queue:
            raise QueueFull
        self._jobs[job.id] = job
        try:
            self._conn.send(("submit", job.id, job.seqs, job.stop, job.created))
        except OSError:  # the child is gone and the loop has not heard yet: the job fails with the rest
            self._died()
            return
        self._submitted += 1

    def cancel(self, job: Job) -> None:
        """Cancel ``job`` (its client is gone): the child drops its rows before its next step."""
        if job.finished or self._jobs.pop(job.id, None) is None:
            return
        job.cancel()
        if self.error is None:
            try:
                self._conn.send(("cancel", job.id))
            except OSError:
                self._died()

    async def sync_metrics(self) -> None:
        """Bring the engine's counters in ``metrics`` up to date: ask the child, await its answer
        (exact at the time of the scrape, after the step it is running)."""
        if not self.ready or self.error is not None:
            return
        answer = asyncio.get_running_loop().create_future()
        self._scrapes.append(answer)
        try:
            self._conn.send(("metrics",))
        except OSError:
            self._died()
        await answer

    # --- the child's messages ----------------------------------------------------------------------

    def _readable(self) -> None:
        """On the loop, when the pipe has data: every message that has arrived."""
        conn = self._conn
        try:
            while conn.poll():
                self._handle(conn.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(conn.fileno())
            self._died()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            _, updates, self._waiting, self._received = message
            self._apply(updates)
        elif kind == "metrics":
            _, counters, self._waiting, self._received = message
            self.metrics.set(**counters)
            if self._scrapes:
                self._scrapes.popleft().set_result(None)
        elif kind == "loaded":
            try:
                self.tokenizer = self._load_tokenizer()
                self.info = ModelInfo(*message[1])
                self.ready = True
            except Exception as e:  # noqa: BLE001 - reported by the CLI as one line
                self.load_error = str(e) or type(e).__name__
            self.loaded.set()
        elif kind == "failed":
            self.load_error = message[1]
            self.loaded.set()

    def _apply(self, updates: list[tuple]) -> None:
        """A step's updates onto the jobs' mirror ``Seq``s, and their events onto the jobs' queues."""
        jobs = self._jobs
        for job_id, i, text, start, tokens, lps, tops, prompt, reason, error in updates:
            job = jobs.get(job_id)
            if job is None:  # cancelled here meanwhile
                continue
            seq = job.seqs[i]
            if tokens:
                seq.tokens += tokens
                if lps is not None:
                    seq.token_logprobs += lps
                    seq.top_logprobs += tops
            if prompt is not None:
                seq.prompt_token_logprobs, seq.prompt_top_logprobs = prompt
            if reason is not None:
                if error is None:
                    seq.finish_reason = reason
                job.closed[i] = True
                if job.finished:
                    del jobs[job_id]
            job.events.put_nowait(Event(i, text, start, start + len(tokens), reason, error))

    def _died(self) -> None:
        """The pipe reached EOF: the child is gone. Fail the jobs in flight; /health says why."""
        if self.error is not None:
            return
        self._process.join(1)
        code = self._process.exitcode
        self.error = f"the engine process ended unexpectedly (exit code {code}): restart slm serve"
        self.ready = False
        if not self.loaded.is_set():
            self.load_error = f"the engine process ended while loading (exit code {code})"
            self.loaded.set()
        for job in self._jobs.values():
            for i, closed in enumerate(job.closed):
                if not closed:
                    job.closed[i] = True
                    n = len(job.seqs[i].tokens)
                    job.events.put_nowait(Event(i, "", n, n, "error", error=self.error))
        self._jobs.clear()
        while self._scrapes:
            self._scrapes.popleft().set_result(None)


class ChildEngine(Engine):
    """The engine's loop in the child process: jobs come from the pipe, events leave through it."""

    conn: Connection

    def _loaded(self) -> None:
        self._jobs_by_id: dict[int, Job] = {}  # submitted, not finished or cancelled
        self._received = 0  # jobs read from the pipe
        self._reported = (0, 0)  # (waiting, received) the parent last heard
        if self.ready:
            self.conn.send(("loaded", astuple(self.info)))
        else:
            self.conn.send(("failed", self.load_error))

    def _wait(self, batch) -> bool:  # noqa: ANN001 - a ContinuousBatch
        """Read what the parent sent (blocking while there is nothing to step), then admit jobs."""
        while True:
            if not self._receive(block=batch.idle and not self._pending):
                return False
            if not (batch.idle and not self._pending):
                break
        self._admit(batch)
        return True

    def _receive(self, block: bool) -> bool:
        """Handle the messages that have arrived (at least one if ``block``); False: stop."""
        conn = self.conn
        if not block and not conn.poll():
            return True
        try:
            while True:
                if not self._handle(conn.recv()):
                    return False
                if not conn.poll():
                    return True
        except (EOFError, OSError):  # the parent is gone
            return False

    def _handle(self, message: tuple) -> bool:
        kind = message[0]
        if kind == "submit":
            _, job_id, seqs, stop, created = message
            job = Job(seqs, self.tokenizer, stop, None)
            job.id, job.created, job.prompt_sent = job_id, created, [False] * len(seqs)
            self._jobs_by_id[job_id] = job
            self._pending.append(job)
            self._received += 1
        elif kind == "cancel":
            job = self._jobs_by_id.pop(message[1], None)
            if job is not None:
                job.cancel()
        elif kind == "metrics":
            self.metrics.set(queue_depth=len(self._pending))
            self.conn.send(("metrics", self.metrics.engine_counters(), *self._report()))
        elif kind == "stop":
            return False
        return True

    def _report(self) -> tuple[int, int]:
        self._reported = (len(self._pending), self._received)
        return self._reported

    def _hand_over(self, pairs: list[tuple[Job, Event]]) -> None:
        """One message for the step: each event with its new tokens (and logprobs where asked)."""
        updates = []
        for job, event in pairs:
            if job.cancelled:  # the parent has forgotten it
                continue
            i, start, end = event.index, event.start, event.end
            seq = job.seqs[i]
            tokens = seq.tokens[start:end]
            lps = tops = prompt = None
            if seq.logprobs is not None:
                lps, tops = seq.token_logprobs[start:end], seq.top_logprobs[start:end]
            if seq.prompt_logprobs and not job.prompt_sent[i] and (end > start or event.finish_reason):
                job.prompt_sent[i] = True
                prompt = (seq.prompt_token_logprobs, seq.prompt_top_logprobs)
            updates.append((job.id, i, event.text, start, tokens, lps, tops, prompt, event.finish_reason, event.error))
            if job.finished:
                self._jobs_by_id.pop(job.id, None)
        if updates or self._reported != (len(self._pending), self._received):
            self.conn.send(("step", updates, *self._report()))


def child_main(conn: Connection, load: Callable[[], tuple[Any, Any]], cfg: ServeConfig) -> None:
    """The child process: the engine ``cfg`` describes, serving ``load()``'s model over ``conn``
    until the parent says stop or goes away."""
    from slmkit.serve.cli import make_engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    engine = make_engine(cfg, load, ChildEngine)
    engine.conn = conn
    try:
        engine._run()
    except (BrokenPipeError, ConnectionResetError):  # the parent went away while we wrote: nobody to serve
        pass

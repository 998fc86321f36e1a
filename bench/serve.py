"""Serving under load: ``slm serve`` with 1, 4, 16 and 64 concurrent streaming clients on localhost.

    python bench/serve.py            # the table in docs/serving.md (~6 minutes on 2 cores: 4 of training)
    python bench/serve.py --run RUN  # the same loads on a run you have (e.g. one trained before)
    python bench/serve.py --smoke    # seconds: stories260k shape, random weights, 1 and 4 clients
    python bench/serve.py --run RUN --engine-only  # the same loads through the server's engine, no HTTP

The server runs a stories15m-shape model trained here first (``slm prepare`` on the TinyStories
sample, a BPE of 4096 tokens, then ``slm train --preset stories15m`` for ``--train-minutes``
minutes: a model that writes TinyStories-like text, so the sampling filters and the text streams see
the peaked distributions and whole words of a real model); ``--train-minutes 0`` uses random
weights. ``ignore_eos`` makes every request run to ``max_tokens`` either way. Each client sends its requests one after another
(streaming completions of a TinyStories opening, temperature 0.8, top-p 0.95, its own seed) and
records when the first token and every later one arrived. The clients are what a load generator
is: asyncio protocols on one event loop (uvloop's where installed) in this process, one keep-alive
HTTP/1.1 connection per client, parsing the chunked event stream in the loop's read callback, and
every event's JSON decoded; a chunk arrived when the bytes ending it were read (a full HTTP client
library, or asyncio streams, cost the 2 shared cores more per chunk). Every request asks for the usage chunk
(``stream_options.include_usage``), and the tokens counted are the completion tokens the server
reports (checked: ``max_tokens`` for every request). Per load: aggregate tokens/s (all tokens
/ wall time), time to first token (TTFT) and inter-token latency (ITL) p50 / p99. Baselines measured
in the same round: the same kind of requests sent one at a time ("sequential"), and batch-1
``slm generate`` in this process (``generate_tokens``, no HTTP) while the server is idle. Every round
runs every load, alternating; the table shows medians over rounds, ratios per round.

No two requests of a run send the same opening (valid.txt's stories, then train.txt's): with the
server's prefix cache (``--prefix-cache-mb``) a repeated prompt would cost only its last token. Openings
still share their first words ("Once upon a time, there was a"), as real prompts share a system
prompt; the share of prompt tokens the prefix cache held is read from ``/metrics`` per load.
``--shared-prefix-tokens N`` puts the same N-token preamble before every opening, as a chat's
system prompt is before every conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "data" / "tinystories" / "valid.txt"


def stories(n: int) -> list[str]:
    """The first ``n`` TinyStories documents of the shared sample, valid.txt's then train.txt's (or
    made-up ones, each different, without it)."""
    docs = []
    for path in (STORIES, STORIES.with_name("train.txt")):
        if path.exists() and len(docs) < n:
            docs += [d.strip() for d in path.read_text(encoding="utf-8").split("<|endoftext|>") if d.strip()]
    if len(docs) >= 10:
        return docs[:n]
    return [f"Once upon a time there was a little {w} number {i} who liked to play in the park with friends."
            for i in range(n // 10 + 1) for w in ("girl", "boy", "dog", "cat", "bird", "fish", "bear", "frog", "duck", "fox")][:n]


class Openings:
    """Story openings of about ``tokens`` tokens, each handed out once: no request of a run repeats
    another's prompt (the server's prefix cache would make it all but free)."""

    def __init__(self, tok, tokens: int, count: int, preamble: int = 0) -> None:
        seen, self.texts = set(), []
        candidates = stories(20 * count)  # some stories open alike: more to choose from
        # a story from the end of those, far from the openings used, cut to ``preamble`` tokens
        pre = tok.decode(tok.encode(candidates[-1])[:preamble]) + " " if preamble else ""
        for story in candidates:
            text = tok.decode(tok.encode(story[: 12 * tokens])[:tokens])  # ~4 characters a token: no need to encode it all
            if text not in seen:
                seen.add(text)
                self.texts.append(pre + text)
                if len(self.texts) == count:
                    break
        self.used = 0
        if len(self.texts) < count:
            raise SystemExit(f"only {len(self.texts)} different story openings for {count} requests: "
                             "fewer rounds, clients or requests per client")

    def take(self, n: int) -> list[str]:
        """The next ``n`` openings, never handed out before."""
        if self.used + n > len(self.texts):
            raise SystemExit(f"out of story openings after {self.used}")
        self.used += n
        return self.texts[self.used - n : self.used]


def train_run(work: Path, preset: str, vocab: int, minutes: float) -> Path:
    """A run of ``preset``'s shape trained for ``minutes`` on the TinyStories sample (a short warmup
    and a learning rate for a few hundred steps instead of the preset's 20,000)."""
    cli = [sys.executable, "-m", "slmkit.cli"]
    subprocess.run(cli + ["prepare", "--input", str(STORIES.with_name("train.txt")), "--val-input", str(STORIES),
                          "--out", str(work / "data"), "--vocab-size", str(vocab)], check=True, cwd=ROOT)
    subprocess.run(cli + ["train", "--data", str(work / "data"), "--out", str(work / "run"), "--preset", preset,
                          "--max-time", f"{minutes}m", "--quiet", "train.grad_accum=1", "train.warmup_steps=30",
                          "train.lr=2e-3", "train.schedule=wsd", "train.decay_fraction=0.2", "train.compile=false",
                          "train.eval_interval=100"], check=True, cwd=ROOT)
    return work / "run"


def describe(run: Path) -> dict:
    """How the served run was made: its training steps and best validation loss (None: random weights)."""
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return {"trained": False}
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    return {"trained": True, "train_steps": max((r.get("step", 0) for r in rows), default=0),
            "val_loss": min(val) if val else None}


def make_run(out: Path, preset: str, vocab: int) -> Path:
    """A run of ``preset``'s shape with random weights and a BPE of ``vocab`` tokens."""
    from slmkit.config import from_dict, load_preset
    from slmkit.model import GPT, ModelConfig
    from slmkit.rundir import create_run
    from slmkit.tokenizer import train_bpe
    from slmkit.trainer import TrainConfig

    tok = train_bpe(stories(3000), vocab)
    section = dict(load_preset(preset)["model"], vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = GPT(from_dict(ModelConfig, section, "model")).eval()
    return create_run(out, model, tok, TrainConfig())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of a load-generating client: an asyncio protocol that
    parses what ``slm serve`` answers (a chunked ``text/event-stream``) as its bytes arrive, in the
    event loop's read callback. A client's cost per streamed chunk is taken from the 2 cores the
    server runs on, so it is kept small: no full HTTP client library, and no coroutine resumed
    per chunk (asyncio streams' ``readuntil``/``readexactly`` per chunk cost the clients half as
    much CPU time again: 18-19 us a token at 16 clients instead of 12)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.head = True  # reading the status line and headers
        self.events: list[tuple[float, bytes]] = []
        self.pending = b""  # an event's bytes not yet ended by its blank line
        self.done: asyncio.Future | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> "Connection":
        _, conn = await asyncio.get_running_loop().create_connection(cls, host, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc or ConnectionError("the server closed the connection"))

    async def post_stream(self, host: str, path: str, body: bytes) -> list[tuple[float, bytes]]:
        """POST ``body`` (JSON); ``(arrival time, payload)`` of every server-sent event's ``data:``,
        timed when the bytes ending it arrived."""
        self.done = asyncio.get_running_loop().create_future()
        self.buf, self.head, self.events, self.pending = b"", True, [], b""
        self.transport.write(f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                             f"accept: text/event-stream\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
        return await self.done

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf + data
        if self.head:
            cut = buf.find(b"\r\n\r\n")
            if cut < 0:
                self.buf = buf
                return
            head, buf = buf[:cut].lower(), buf[cut + 4 :]
            if not head.startswith(b"http/1.1 200") or b"transfer-encoding: chunked" not in head:
                self.done.set_exception(RuntimeError(f"unexpected answer: {head!r}"))
                self.transport.close()
                return
            self.head = False
        while True:  # whole chunks: a size line, the data, CRLF
            line = buf.find(b"\r\n")
            if line < 0:
                break
            size = int(buf[:line], 16)
            if len(buf) < line + 2 + size + 2:
                break
            chunk, buf = buf[line + 2 : line + 2 + size], buf[line + 4 + size :]
            if size == 0:  # the last chunk: the response is complete
                self.done.set_result(self.events)
                break
            pending = self.pending + chunk
            while True:  # sse-starlette ends events with a blank line (\r\n\r\n)
                cut = pending.find(b"\r\n\r\n")
                if cut < 0:
                    break
                for field in pending[:cut].split(b"\r\n"):
                    if field.startswith(b"data:"):
                        self.events.append((now, field[5:].strip()))
                pending = pending[cut + 4 :]
            self.pending = pending
        self.buf = buf

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def one_request(conn: Connection, host: str, prompt: str, max_tokens: int, seed: int) -> dict:
    """One streaming completion: when each chunk with text arrived, and the tokens it reports."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0.8,
            "top_p": 0.95, "seed": seed, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    arrivals, tokens = [], 0
    for at, data in await conn.post_stream(host, "/v1/completions", json.dumps(body).encode()):
        if data == b"[DONE]":
            continue
        chunk = json.loads(data)
        if chunk["choices"] and chunk["choices"][0]["text"]:
            arrivals.append(at)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": arrivals[0] - sent, "itl": [b - a for a, b in zip(arrivals, arrivals[1:])],
            "chunks": len(arrivals), "tokens": tokens}


async def load(url: str, clients: int, per_client: int, prompts: list[str], max_tokens: int) -> dict:
    """``clients`` concurrent clients, each sending ``per_client`` requests one after another over
    its own connection."""
    host, port = url.removeprefix("http://").split(":")

    async def run(c: int) -> list[dict]:
        conn = await Connection.open(host, int(port))
        try:
            return [await one_request(conn, f"{host}:{port}", prompts[c * per_client + i], max_tokens,
                                      seed=c * per_client + i) for i in range(per_client)]
        finally:
            conn.close()

    t0 = time.perf_counter()
    done = await asyncio.gather(*(run(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    results = [r for rs in done for r in rs]
    tokens = sum(r["tokens"] for r in results)
    if tokens != clients * per_client * max_tokens:
        raise RuntimeError(f"{tokens} tokens generated, expected {clients * per_client * max_tokens}")
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "chunks": sum(r["chunks"] for r in results), "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "itl_p50_s": pct(itl, 0.5), "itl_p99_s": pct(itl, 0.99)}


def prefix_counts(url: str) -> tuple[float, float]:
    """The server's prefix-cache hit and looked-up prompt tokens so far (from /metrics)."""
    import httpx

    from slmkit.serve.metrics import parse

    m = parse(httpx.get(f"{url}/metrics").text)
    return m.get("slm_prefix_cache_hits_total", 0.0), m.get("slm_prefix_cache_queries_total", 0.0)


class CpuMeter:
    """Where a load's CPU time went (Linux; None elsewhere): the server's threads, and those of its
    child processes (the engine's process), grouped by the name the OS shows (``slm-engine``: the
    engine's Python and the C++ step it calls; ``slm-decode``: the step's other threads; the
    server's main thread: the event loop; ``other``: PyTorch's threads and the rest), this
    process's (the clients'), and the share of the machine's CPU time that was idle."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        try:  # a load's CPU in nanoseconds where the kernel keeps schedstats (else 0), not 10 ms ticks
            self.schedstat = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) > 0
        except (OSError, ValueError, IndexError):
            self.schedstat = False

    def processes(self) -> list[int]:
        """The server's pid and its descendants' (the engine's process, multiprocessing's helper)."""
        parents: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):  # a process that ended meanwhile
                    continue
                parents.setdefault(ppid, []).append(int(entry.name))
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop(0)
            out.append(pid)
            todo += sorted(parents.get(pid, []))
        return out

    def read(self) -> dict | None:
        try:
            groups: dict[str, float] = {}
            engine_seen = False
            for pid in self.processes():
                try:
                    tasks = sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda t: int(t.name))
                except OSError:
                    continue
                for task in tasks:
                    try:  # nanoseconds on a CPU (schedstat), else clock ticks of user and system time (stat)
                        name = (task / "comm").read_text().strip()
                        ran = int((task / "schedstat").read_text().split()[0]) / 1e9 if self.schedstat else \
                            sum(int(x) for x in (task / "stat").read_text().rsplit(")", 1)[1].split()[11:13]) / self.hz
                    except OSError:  # a thread that ended meanwhile
                        continue
                    # threads started by the engine thread inherit its name: the first (lowest id) is it
                    group = "event loop" if task.name == str(self.pid) else name if name == "slm-decode" else \
                        "slm-engine" if name == "slm-engine" and not engine_seen else "other"
                    engine_seen |= group == "slm-engine"
                    groups[group] = groups.get(group, 0.0) + ran
            me = resource.getrusage(resource.RUSAGE_SELF)  # microseconds
            groups["clients"] = me.ru_utime + me.ru_stime
            cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            return {"threads": groups, "idle": cpu[3] + cpu[4], "total": sum(cpu)}  # clock ticks: a share of them is exact
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def per_token(before: dict | None, after: dict | None, tokens: int) -> dict | None:
        """CPU microseconds per generated token of each group between two reads, and the idle share."""
        if before is None or after is None:
            return None
        out = {g: 1e6 * (t - before["threads"].get(g, 0.0)) / tokens for g, t in after["threads"].items()}
        total = after["total"] - before["total"]
        out["idle_share"] = (after["idle"] - before["idle"]) / total if total > 0 else None
        return out


def run_load(url: str, clients: int, per_client: int, openings: Openings, max_tokens: int,
             meter: CpuMeter | None = None) -> dict:
    """``load`` with fresh openings on uvloop's event loop where it is installed (as a load generator
    would), else asyncio's; with the share of its prompt tokens the server's prefix cache held and,
    given a ``meter``, the CPU time per generated token of the server's threads and the clients."""
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    hits0, queries0 = prefix_counts(url)
    prompts = openings.take(clients * per_client)
    with asyncio.Runner(loop_factory=factory) as runner:
        cpu0 = meter.read() if meter else None
        out = runner.run(load(url, clients, per_client, prompts, max_tokens))
        cpu = meter.read() if meter else None
    out["cpu_us_per_token"] = CpuMeter.per_token(cpu0, cpu, out["tokens"])
    hits, queries = prefix_counts(url)
    out.update(prefix_hit_tokens=hits - hits0, prefix_query_tokens=queries - queries0)
    return out


def generate_speed(run: Path, prompt: str, max_tokens: int, threads: int) -> float:
    """Batch-1 ``slm generate`` (``generate_tokens``, the fast path) tokens/s, in this process."""
    from slmkit.checkpoint import load_run
    from slmkit.generate import SamplingConfig, generate_tokens

    torch.set_num_threads(threads)
    model, tok, _ = load_run(run)
    cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=0.8, top_k=0, top_p=0.95, stop_at_eot=False, seed=0)
    ids = tok.encode(prompt)
    generate_tokens(model, [ids], cfg)  # warm up
    t0 = time.perf_counter()
    generate_tokens(model, [ids], cfg)
    return max_tokens / (time.perf_counter() - t0)


def engine_load(batch, tok, clients: int, per_client: int, prompts: list[str], max_tokens: int, seed: int) -> dict:
    """The requests of one load stepped through the server's engine batch in this process, with no
    HTTP: client c's first request joins before step c (as requests over HTTP arrive spread out),
    each next one as soon as its last has ended; sampled as the HTTP loads' (temperature 0.8,
    top-p 0.95, a seed each, every request to ``max_tokens``)."""
    from slmkit.generate.continuous import Seq
    from slmkit.generate.sampling import SamplingConfig

    todo = [[tok.encode(p) for p in prompts[c * per_client : (c + 1) * per_client]] for c in range(clients)]
    live: dict = {}
    sent = tokens = step = 0

    def send(c: int) -> None:
        nonlocal sent
        if todo[c]:
            cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=0.8, top_k=0, top_p=0.95, stop_at_eot=False,
                                 seed=seed + sent)
            seq = Seq(todo[c].pop(0), cfg, max_tokens)
            live[seq], sent = c, sent + 1
            batch.add(seq)

    t0 = time.perf_counter()
    with torch.inference_mode():
        while live or step < clients:
            if step < clients:
                send(step)
            step += 1
            for seq in batch.step():
                if seq.done and seq in live:
                    tokens += len(seq.tokens)
                    send(live.pop(seq))
    wall = time.perf_counter() - t0
    if tokens != clients * per_client * max_tokens:
        raise RuntimeError(f"{tokens} tokens generated, expected {clients * per_client * max_tokens}")
    return {"clients": clients, "requests": clients * per_client, "tokens": tokens, "wall_s": wall,
            "tok_per_s": tokens / wall, "steps": step}


def engine_only(args: argparse.Namespace, run: Path, tok, openings: Openings, max_batch: int, what: str) -> int:
    """``--engine-only``: the same loads stepped through the server's engine (``Engine.new_batch``:
    its decoder, KV cache, prefix cache and settings) in this process: how far batching alone
    scales, without the HTTP layer and the clients sharing the cores."""
    from slmkit.checkpoint import load_run
    from slmkit.serve.cli import make_engine
    from slmkit.serve.config import ServeConfig

    cfg = ServeConfig(max_batch=max_batch, threads=args.threads, kv_cache=args.kv_cache, weights=args.weights,
                      prefix_cache_mb=args.prefix_cache_mb)
    engine = make_engine(cfg, lambda: (load_run(run)[0].eval(), tok))
    engine.start()
    engine.loaded.wait()
    if engine.load_error:
        raise SystemExit(f"cannot load {run}: {engine.load_error}")
    torch.set_num_threads(args.threads)
    try:
        engine_load(engine.new_batch(), tok, 1, 1, openings.take(1), args.max_tokens, 0)  # warm up
        rounds = []
        for r in range(args.rounds):
            rounds.append([engine_load(engine.new_batch(), tok, c, args.requests_per_client,
                                       openings.take(c * args.requests_per_client), args.max_tokens, 1000 * r)
                           for c in args.clients])
            print(f"round {r + 1}: " + ", ".join(f"{x['clients']} clients {x['tok_per_s']:.0f} tok/s" for x in rounds[-1]),
                  flush=True)
    finally:
        engine.stop()
    table = ["| clients | aggregate tokens/s | vs 1 client | steps per load |", "|---|---|---|---|"]
    summary = []
    for i, c in enumerate(args.clients):
        s = {"clients": c, "tok_per_s": statistics.median(row[i]["tok_per_s"] for row in rounds),
             "vs_one_client": statistics.median(row[i]["tok_per_s"] / row[0]["tok_per_s"] for row in rounds),
             "steps": statistics.median(row[i]["steps"] for row in rounds)}
        summary.append(s)
        table.append(f"| {c} | {s['tok_per_s']:,.0f} | {s['vs_one_client']:.2f}x | {s['steps']:.0f} |")
    table += ["", f"The server's engine without HTTP (medians of {args.rounds} rounds): {args.preset} shape ({what}), "
                  f"prompts of about {args.prompt_tokens} tokens, {args.max_tokens} new tokens per request, "
                  f"{args.requests_per_client} requests per client, client c's first request before step c, "
                  f"--threads {args.threads} --max-batch {max_batch} --kv-cache {args.kv_cache} --weights "
                  f"{args.weights} --prefix-cache-mb {args.prefix_cache_mb}."]
    print("\n".join(table))
    save(args.out, {"engine_only": True, "requests_per_client": args.requests_per_client, "rounds": rounds,
                    "summary": summary, "table": table})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="stories15m")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32, help="about this many prompt tokens per request")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-minutes", type=float, default=4.0,
                        help="train the model this long first (0: random weights)")
    parser.add_argument("--run", default=None, help="serve this RUN_DIR instead of making one")
    parser.add_argument("--smoke", action="store_true", help="seconds: stories260k shape, 1 and 4 clients, 32 tokens, "
                        "1 round, written to a temporary file (not bench/results)")
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/serve.json)")
    parser.add_argument("--kv-cache", default=None, choices=["fp32", "bf16"],
                        help="the server's --kv-cache (default: the server's default)")
    parser.add_argument("--weights", default=None, choices=["fp32", "bf16"],
                        help="the server's --weights (default: the server's default)")
    parser.add_argument("--stream-interval", type=int, default=None,
                        help="the server's --stream-interval: tokens per streamed event (default: the server's default)")
    parser.add_argument("--prefix-cache-mb", type=int, default=None,
                        help="the server's --prefix-cache-mb (default: the server's default; 0: off)")
    parser.add_argument("--engine-only", action="store_true",
                        help="step the server's engine in this process, no HTTP (default out: bench/results/serve_engine.json)")
    parser.add_argument("--shared-prefix-tokens", type=int, default=0,
                        help="the same preamble of this many tokens before every opening (a system prompt)")
    args = parser.parse_args()
    if args.smoke:
        # 32 tokens: random weights often sample a byte that is part of a character, and the text
        # streams hold it back, so 8 tokens could arrive as one text chunk (no inter-token gap to time).
        args.preset, args.vocab, args.clients, args.max_tokens, args.rounds = "stories260k", 512, [1, 4], 32, 1
        args.train_minutes = 0
        args.requests_per_client, args.prompt_tokens = 1, 8
        args.out = args.out or str(Path(tempfile.mkdtemp(prefix="slm-serve-smoke-"))
                                   / ("serve_engine.json" if args.engine_only else "serve.json"))
    args.out = args.out or str(ROOT / "bench" / "results" / ("serve_engine.json" if args.engine_only else "serve.json"))
    work = Path(tempfile.mkdtemp(prefix="slm-bench-serve-"))
    if args.run:
        run = Path(args.run)
    elif args.train_minutes > 0 and STORIES.exists():
        run = train_run(work, args.preset, args.vocab, args.train_minutes)
    else:
        run = make_run(work / "run", args.preset, args.vocab)
    model_info = describe(run)
    from slmkit.config import load_toml

    shape = load_toml(run / "config.toml")["model"]
    model_info.update(n_layer=shape["n_layer"], n_embd=shape["n_embd"], vocab=shape["vocab_size"])
    if model_info["trained"]:
        what = (f"trained {model_info['train_steps']} steps, validation loss {model_info['val_loss']:.2f}"
                if model_info["val_loss"] is not None else f"trained {model_info['train_steps']} steps")
    else:
        what = "random weights"
    from slmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(run / "tokenizer")
    seq_requests = max(4, min(8, max(args.clients)))
    openings = Openings(tok, args.prompt_tokens,
                        1 + args.rounds * (seq_requests + args.requests_per_client * sum(args.clients)),
                        args.shared_prefix_tokens)
    max_batch = max(args.clients)
    from slmkit.serve.config import ServeConfig

    args.kv_cache = args.kv_cache or ServeConfig.kv_cache  # recorded as what the server ran with
    args.weights = args.weights or ServeConfig.weights
    if args.stream_interval is None:
        args.stream_interval = ServeConfig.stream_interval
    if args.prefix_cache_mb is None:
        args.prefix_cache_mb = ServeConfig.prefix_cache_mb
    if args.engine_only:
        return engine_only(args, run, tok, openings, max_batch, what)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", str(run), "--port", str(port),
                               "--threads", str(args.threads), "--max-batch", str(max_batch),
                               "--max-queue", str(4 * max_batch),
                               "--kv-cache", args.kv_cache, "--weights", args.weights,
                               "--prefix-cache-mb", str(args.prefix_cache_mb),
                               "--stream-interval", str(args.stream_interval)],
                              stdout=log, stderr=log, cwd=ROOT)
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {(work / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        run_load(url, 1, 1, openings, args.max_tokens)  # warm up
        meter = CpuMeter(server.pid)
        rounds = []
        for r in range(args.rounds):
            row = {"generate_batch1_tok_per_s": generate_speed(run, openings.texts[0], args.max_tokens, args.threads)}
            row["sequential"] = run_load(url, 1, seq_requests, openings, args.max_tokens)
            row["loads"] = [run_load(url, c, args.requests_per_client, openings, args.max_tokens, meter)
                            for c in args.clients]
            rounds.append(row)
            print(f"round {r + 1}: generate {row['generate_batch1_tok_per_s']:.0f} tok/s, sequential "
                  f"{row['sequential']['tok_per_s']:.0f} tok/s, " + ", ".join(
                      f"{x['clients']} clients {x['tok_per_s']:.0f} tok/s" for x in row["loads"]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    def hit_rate(loads: list[dict]) -> float | None:
        """The share of these loads' prompt tokens the prefix cache held (None: it was off)."""
        queries = sum(x["prefix_query_tokens"] for x in loads)
        return sum(x["prefix_hit_tokens"] for x in loads) / queries if queries else None

    table = ["| clients | aggregate tokens/s | vs sequential | vs 1 client | vs batch-1 slm generate | TTFT p50 | "
             "TTFT p99 | ITL p50 | ITL p99 | prefix cache hits |", "|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for i, c in enumerate(args.clients):
        per = [row["loads"][i] for row in rounds]
        s = {"clients": c, "tok_per_s": med([x["tok_per_s"] for x in per]),
             "vs_sequential": med([row["loads"][i]["tok_per_s"] / row["sequential"]["tok_per_s"] for row in rounds]),
             "vs_one_client": med([row["loads"][i]["tok_per_s"] / row["loads"][0]["tok_per_s"] for row in rounds]),
             "vs_generate": med([row["loads"][i]["tok_per_s"] / row["generate_batch1_tok_per_s"] for row in rounds]),
             **{k: med([x[k] for x in per]) for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")},
             "prefix_hit_rate": hit_rate(per)}
        summary.append(s)
        hits = "off" if s["prefix_hit_rate"] is None else f"{s['prefix_hit_rate']:.0%}"
        table.append(f"| {c} | {s['tok_per_s']:,.0f} | {s['vs_sequential']:.2f}x | {s['vs_one_client']:.2f}x | "
                     f"{s['vs_generate']:.2f}x | {s['ttft_p50_s'] * 1000:.0f} ms | {s['ttft_p99_s'] * 1000:.0f} ms | "
                     f"{s['itl_p50_s'] * 1000:.1f} ms | {s['itl_p99_s'] * 1000:.1f} ms | {hits} |")
    overall = hit_rate([row["sequential"] for row in rounds] + [x for row in rounds for x in row["loads"]])
    seq = med([row["sequential"]["tok_per_s"] for row in rounds])
    gen = med([row["generate_batch1_tok_per_s"] for row in rounds])
    table += ["", f"Baselines (medians): the same requests one at a time over HTTP {seq:,.0f} tokens/s; batch-1 "
                  f"`slm generate` in-process {gen:,.0f} tokens/s. {args.preset} shape ({what}, vocab "
                  f"{model_info['vocab']}), prompts of about {args.prompt_tokens} tokens"
                  + (f" after a shared preamble of {args.shared_prefix_tokens}" if args.shared_prefix_tokens else "")
                  + f", {args.max_tokens} new tokens per "
                  f"request, {args.requests_per_client} requests per client, server --threads {args.threads} "
                  f"--max-batch {max_batch} --kv-cache {args.kv_cache} --weights {args.weights} "
                  f"--prefix-cache-mb {args.prefix_cache_mb}"
                  + (f" --stream-interval {args.stream_interval} (each event {args.stream_interval} tokens but the "
                     "first: ITL is the time between events)" if args.stream_interval > 1 else "")
                  + f", {args.rounds} rounds, every request a different story opening"
                  + ("" if overall is None else f" (the prefix cache held {overall:.0%} of all prompt tokens)")
                  + "; clients (asyncio protocols on one event loop in the "
                  f"benchmark's process, one keep-alive connection each) and server share the machine."]
    cpu_rows = []
    for i, c in enumerate(args.clients):
        per = [row["loads"][i].get("cpu_us_per_token") for row in rounds]
        if all(per):
            groups = ("slm-engine", "slm-decode", "event loop", "other", "clients")
            cells = [med([x.get(g, 0.0) for x in per]) for g in groups]
            total = med([sum(x.get(g, 0.0) for g in groups) for x in per])
            idle = med([x["idle_share"] for x in per if x["idle_share"] is not None] or [float("nan")])
            summary[i]["cpu_us_per_token"] = dict(zip(groups, cells), all=total, idle_share=idle)
            cpu_rows.append(f"| {c} | " + " | ".join(f"{v:.0f}" for v in cells) + f" | {total:.0f} | {idle:.0%} |")
    if cpu_rows:
        table += ["", "CPU time per generated token, microseconds (medians over rounds; from /proc during each load): "
                      "the server's engine thread (its Python and its share of the C++ step), the step's other "
                      "threads, the event loop, the server's other threads, the benchmark's clients; and the "
                      "share of both cores left idle" + ("" if meter.schedstat else
                                                         " (the kernel counts in 10 ms ticks: small entries are rough)")
                  + ".", "",
                  "| clients | slm-engine | slm-decode | event loop | other | clients | all | cores idle |",
                  "|---|---|---|---|---|---|---|---|", *cpu_rows]
    goal = {s["clients"]: s for s in summary}
    if 1 in goal and 16 in goal:  # issue 17's goal: 16 clients >= 4x one client, p99 TTFT < 1 s
        met = goal[16]["vs_one_client"] >= 4 and goal[16]["ttft_p99_s"] < 1
        table += ["", f"Goal (16 clients at least 4x the aggregate tokens/s of one client, p99 time to first token "
                      f"under 1 s): **{goal[16]['vs_one_client']:.2f}x**, p99 TTFT **{goal[16]['ttft_p99_s'] * 1000:.0f} "
                      f"ms**: {'met' if met else 'not met'} (median of per-round ratios)."]
    print("\n".join(table))
    save(args.out, {"preset": args.preset, "vocab": model_info["vocab"], "model": model_info,
                    "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
                    "threads": args.threads, "kv_cache": args.kv_cache, "weights": args.weights,
                    "stream_interval": args.stream_interval, "prefix_cache_mb": args.prefix_cache_mb,
                    "prefix_hit_rate": overall, "shared_prefix_tokens": args.shared_prefix_tokens, "rounds": rounds,
                    "summary": summary, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())

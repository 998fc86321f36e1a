"""``[serve]``: the settings of ``slm serve`` (flags made from the fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slmkit.errors import SlmError


@dataclass
class ServeConfig:
    """Where the server listens, who may use it, and how much work it takes on at once."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on; 0.0.0.0 opens it to the network (default %(default)s)"})
    port: int = field(default=8000, metadata={"help": "TCP port (default %(default)s)"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on the API routes", "metavar": "KEY"})
    max_batch: int = field(default=16, metadata={
        "help": "sequences decoded together at most (default %(default)s)", "metavar": "N"})
    max_queue: int = field(default=64, metadata={
        "help": "requests waiting at most; more get 429 (default %(default)s)", "metavar": "M"})
    prefill_chunk: int = field(default=64, metadata={
        "help": "prompt tokens prefilled between two decode steps (default %(default)s)", "metavar": "T"})
    cors: list[str] = field(default_factory=list, metadata={
        "help": "allow browser pages from this origin (e.g. http://localhost:3000); off by default",
        "metavar": "ORIGIN"})
    max_body: int = field(default=1 << 20, metadata={
        "help": "largest request body in bytes; more get 413 (default %(default)s)", "metavar": "BYTES"})
    model_name: str | None = field(default=None, metadata={
        "help": "the model id clients see (default: the run directory's name)", "metavar": "NAME"})
    which: Literal["best", "last"] = field(default="best", metadata={"help": "checkpoint to serve (default %(default)s)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps (default %(default)s)"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for the model (default: PyTorch's)"})
    # The KV cache's element type where the C++ decode step runs (a float32 model on the CPU): bf16
    # stores each key and value rounded to 8 mantissa bits, halving the bytes attention reads per
    # step. Default bf16: measured with bench/serve.py on 2 cores (stories15m shape, 16 clients, 8
    # requests each, three alternating runs of each setting), 16 clients got 5,726-6,074 tokens/s
    # with it and 5,316-5,552 without (+10% median), one client the same; the bare step at batch 16
    # is 12-18% cheaper at a context of 96 and 14-25% at 200 (docs/serving.md). The price: logits
    # within ~1e-2 relative of the fp32 cache's, so a near-tie may pick another greedy token than
    # `slm generate` (fp32) does; a scored prompt's log-probabilities (echo) stay float32. A model
    # not on the C++ step (GPU, another dtype) keeps its own dtype, after one warning.
    kv_cache: Literal["fp32", "bf16"] = field(default="bf16", metadata={
        "help": "KV cache element type of the C++ decode step: bf16 halves the bytes attention reads "
                "(default %(default)s)"})
    # The weight matrices the C++ decode step multiplies by (a float32 run on the CPU): bf16 rounds
    # them to 8 mantissa bits once at load (a copy beside the float32 model), halving the bytes each
    # step reads, and multiplies with AVX512-BF16's vdpbf16ps where the CPU has it (its inputs
    # rounded to bf16 too; float32 arithmetic elsewhere): +3e-6 bits per byte on a trained model
    # (docs/export.md). Default bf16, as vLLM serves float32 checkpoints in half precision
    # (--dtype auto), and faster at every load (bench/serve.py's tables with and without it are in
    # docs/serving.md, "Where it stands"). Greedy tokens may differ from `slm generate`'s
    # (fp32) at a near-tie; a scored prompt's log-probabilities (echo) stay float32. A bf16, int8 or
    # int4 run decodes as it is; a model not on the C++ step (GPU, no C++ library) keeps its weights,
    # after one warning.
    weights: Literal["fp32", "bf16"] = field(default="bf16", metadata={
        "help": "weight matrices of the C++ decode step: bf16 rounds a float32 run's, half the bytes read "
                "per token, bf16 products where the CPU has them (default %(default)s)"})
    # Automatic prefix caching (generate/prefix.py): the keys and values of prompts already run, so
    # a prompt that starts as an earlier one did (a chat's system prompt and past turns, resent every
    # turn) runs only the rest. On by default, as in vLLM: a hit only saves work, and the output is
    # the same. 256 MB holds ~38k tokens of a stories15m-shape model's bf16 keys and values (6.75 KB
    # a token) or ~7k of stories110m's (36 KB): many system prompts and conversations, and little
    # next to the memory of a machine that serves; the least recently used prefixes go first.
    prefix_cache_mb: int = field(default=256, metadata={
        "help": "MB of prompt keys and values kept for reuse by prompts that start the same way; 0: off "
                "(default %(default)s)", "metavar": "MB"})

    # Where the engine runs: "process" (default) steps the model in a child process of its own, so
    # its Python and the HTTP event loop's no longer take turns on one GIL (vLLM V1 runs its engine
    # core the same way); "thread" keeps it on a thread of the server's process (one process: what
    # a debugger or a profiler of the whole server wants). Measured in docs/serving.md.
    engine: Literal["process", "thread"] = field(default="process", metadata={
        "help": "run the engine in its own process (the HTTP side and the model do not share one GIL) "
                "or on a thread of the server's (default %(default)s)"})

    # Tokens a stream's events carry: every token is one server-sent event by default (as vLLM and
    # SGLang stream, --stream-interval 1); N sends a sequence's tokens N at a time (its first token
    # and its end at once), so the HTTP work per event (the engine's message, the event loop's
    # chunk and socket write, the client's read) is spread over N tokens: at 16 streaming clients on
    # 2 cores that work is a quarter of each token's CPU (docs/serving.md).
    stream_interval: int = field(default=1, metadata={
        "help": "tokens per streamed event: more make a loaded server faster and streams coarser "
                "(default %(default)s)", "metavar": "N"})

    def validate(self) -> None:
        """Raise SlmError for a value out of range, naming the flag."""
        checks = [
            (0 <= self.port <= 65535, f"--port must be 0 to 65535, got {self.port}"),
            (self.max_batch >= 1, f"--max-batch must be at least 1, got {self.max_batch}"),
            (self.max_queue >= 0, f"--max-queue must be >= 0, got {self.max_queue}"),
            (self.prefill_chunk >= 1, f"--prefill-chunk must be at least 1, got {self.prefill_chunk}"),
            (self.max_body >= 1024, f"--max-body must be at least 1024 bytes, got {self.max_body}"),
            (self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}"),
            (self.api_key is None or self.api_key.strip() != "", "--api-key must not be empty"),
            (self.kv_cache in ("fp32", "bf16"), f"--kv-cache must be fp32 or bf16, got {self.kv_cache!r}"),
            (self.weights in ("fp32", "bf16"), f"--weights must be fp32 or bf16, got {self.weights!r}"),
            (self.engine in ("process", "thread"), f"--engine must be process or thread, got {self.engine!r}"),
            (self.prefix_cache_mb >= 0, f"--prefix-cache-mb must be >= 0 (0: off), got {self.prefix_cache_mb}"),
            (self.stream_interval >= 1, f"--stream-interval must be at least 1, got {self.stream_interval}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SlmError(message)

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
        ]
        for ok, message in checks:
            if not ok:
                raise SlmError(message)

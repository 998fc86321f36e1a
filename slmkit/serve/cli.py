"""``slm serve RUN``: load the run, start the engine's worker and serve HTTP with uvicorn."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmkit.config import RUN_SECTIONS, add_section_arguments, check_sections, load_toml, section_from_args
from slmkit.errors import SlmError
from slmkit.serve.config import ServeConfig

if TYPE_CHECKING:
    from slmkit.serve.engine import Engine
    from slmkit.serve.process import ProcessEngine

# How long a thread that wants the GIL waits before it asks the holder to let go (Python's
# default: 5 ms). The engine's worker needs it back the moment each C++ decode step returns, while
# the event loop holds it for its whole turn of writing the last step's chunks (a few hundred us at
# 16 streams, more when requests arrive): at 5 ms the worker and the step's second core sat idle
# through that turn. 0.5 ms gave 16 streaming clients about 10% more tokens/s than 5 ms; with the
# step's cheaper attention and MLP, 0.1 ms gave both one client and 16 about 8% more than 0.5 ms
# (bench/serve.py --rounds 6 --clients 1 16, 4 alternating pairs, medians: 16 clients 8,902 ->
# 9,650 tokens/s, one client 2,684 -> 2,916). For the thread engine (--engine thread) only: with the
# engine in its own process each process runs one Python thread that matters, and 5 ms and 0.1 ms
# served alike (3 alternating runs each: 16 clients 10,652 and 10,484 tokens/s, medians).
SWITCH_INTERVAL_S = 0.0001


def passive_openmp() -> None:
    """PyTorch's OpenMP threads sleep as soon as a parallel region ends (``OMP_WAIT_POLICY=passive``)
    unless the environment says otherwise. OpenMP reads it once, when PyTorch loads: call this
    before ``import torch``. The server's PyTorch work is the prefill passes and the KV cache's
    copies between decode steps, whose OpenMP thread then spun for its default 300,000 rounds on a
    core the C++ step, the event loop and the clients need (a twentieth of a core at 16 clients).
    Passive: 16 clients about 4% more tokens/s, and one client's first token sooner (12.5 ->
    9.8 ms p50), bench/serve.py's loads on 2 cores."""
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="RUN_DIR to serve (written by slm train / finetune / import)")
    parser.add_argument("--config", metavar="FILE.toml", help="read the [serve] section; flags win")
    add_section_arguments(parser, ServeConfig)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """``[serve]`` from ``--config`` (if given) with the flags on top, validated."""
    table = {}
    if args.config:
        sections = load_toml(args.config)
        check_sections(sections, RUN_SECTIONS, args.config)
        table = sections.get("serve", {})
    return section_from_args(ServeConfig, args, "serve", table)


def make_engine(cfg: ServeConfig, load: Callable[[], tuple[Any, Any]], kind: type[Engine] | None = None) -> Engine:
    """The engine ``cfg`` asks for (an ``Engine``, or ``kind``: the process engine's child), serving
    what ``load()`` returns in this process, with its prefix cache (None at 0 MB)."""
    from slmkit.generate.prefix import PrefixCache
    from slmkit.serve.engine import Engine

    prefixes = PrefixCache(cfg.prefix_cache_mb << 20) if cfg.prefix_cache_mb else None
    return (kind or Engine)(load, max_batch=cfg.max_batch, max_queue=cfg.max_queue, prefill_chunk=cfg.prefill_chunk,
                            threads=cfg.threads, kv_cache=cfg.kv_cache, prefixes=prefixes, weights=cfg.weights,
                            stream_interval=cfg.stream_interval)


def load_served(run_dir: str, device: str, which: str) -> tuple[Any, Any]:
    """The model (eval mode) and tokenizer of RUN_DIR: module-level, so that a ``functools.partial``
    of it pickles into the engine's child process."""
    from slmkit.checkpoint import load_run

    model, tokenizer, _ = load_run(run_dir, device=device, which=which)
    return model.eval(), tokenizer


def serving_engine(cfg: ServeConfig, run_dir: Path, device: str) -> Engine | ProcessEngine:
    """``slm serve``'s engine: in a child process (``--engine process``) or on a thread."""
    load = functools.partial(load_served, str(run_dir), device, cfg.which)
    if cfg.engine == "thread":
        return make_engine(cfg, load)
    from slmkit.serve.process import ProcessEngine
    from slmkit.tokenizer import load_tokenizer

    return ProcessEngine(load, functools.partial(load_tokenizer, run_dir / "tokenizer"), cfg)


def run_cli(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C; 2 with one line if the run cannot be loaded."""
    passive_openmp()
    cfg = serve_config(args)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.toml").is_file():
        raise SlmError(f"{run_dir} is not a RUN_DIR (no config.toml): pass the folder slm train wrote")
    try:
        import uvicorn

        from slmkit.serve.app import create_app
    except ImportError as e:
        raise SlmError(f"slm serve needs its extra ({e.name} is missing): pip install 'slmkit[serve]'") from None
    from slmkit.runtime import resolve_device

    engine = serving_engine(cfg, run_dir, resolve_device(cfg.device))
    name = cfg.model_name or run_dir.resolve().name
    app = create_app(engine, cfg, name)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                           timeout_graceful_shutdown=2))

    def announce() -> None:
        engine.loaded.wait()
        if engine.load_error:
            server.should_exit = True
            return
        key = ", API key required" if cfg.api_key else ""
        print(f"serving {run_dir} as {name!r} on http://{cfg.host}:{cfg.port} (playground at /{key})",
              file=sys.stderr, flush=True)

    if cfg.engine == "thread":  # one Python thread in each of the process engine's two processes: nothing to switch
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    engine.start()
    threading.Thread(target=announce, daemon=True).start()
    server.run()
    engine.stop()
    if engine.load_error:
        raise SlmError(f"cannot load {run_dir}: {engine.load_error}")
    return 0

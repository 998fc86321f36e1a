"""Sampling a batch, one step at a time: ``Generation`` and ``generate_tokens`` on top of it."""

from __future__ import annotations

from collections.abc import Collection

import torch

from slmkit.errors import SlmError
from slmkit.generate.beam import beam_search
from slmkit.generate.runners import Path, _device_dtype, fit_context, make_runner
from slmkit.generate.sampling import (
    SamplingConfig, _seen_mask, choose, logits_pipeline, make_generator, native_sampling, native_top_p,
)

class Generation:
    """A batch of prompts (token ids, any lengths) continued one token per ``step()``.

    This is the loop behind ``generate_tokens``, ``generate`` and ``stream``, and the piece a
    server drives: a row ends at ``<|endoftext|>`` (if ``cfg.stop_at_eot``; the token is not kept),
    at any of ``stop_ids`` (always; not kept: a chat template's end-of-turn token), after
    ``cfg.max_new_tokens`` tokens, or when the caller calls ``finish(row)`` (a stop string).
    Finished rows leave the batch, so they cost nothing afterwards. It samples (or decodes greedily
    at temperature 0); ``cfg.beams`` is for ``beam_search``.
    """

    def __init__(self, model, prompt_ids: list[list[int]], cfg: SamplingConfig, eot_id: int | None = None,
                 *, path: Path = "fast", stop_ids: Collection[int] = ()) -> None:
        cfg.validate()
        if not prompt_ids:
            raise SlmError("no prompts given")
        self.cfg, self.eot_id = cfg, eot_id
        self._ends = set(stop_ids) | ({eot_id} if cfg.stop_at_eot and eot_id is not None else set())
        contexts = [fit_context(ids, model.config.block_size, eot_id) for ids in prompt_ids]
        self.tokens: list[list[int]] = [[] for _ in contexts]  # the new tokens of each row
        self.done = [False] * len(contexts)
        self._rows = list(range(len(contexts)))  # the prompt index of each live row
        device, _ = _device_dtype(model)
        self._generator = make_generator(cfg.seed, device)
        # Nucleus sampling alone draws in C++ (native_top_p, as a server's rows do), from the
        # numbers choose would draw: the same tokens (tested), without a topk and a float64
        # softmax over the vocabulary per step.
        self._native = (cfg.temperature > 0 and not cfg.top_k and not cfg.min_p and cfg.top_p < 1
                        and cfg.repetition_penalty == 1.0 and native_sampling(device))
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
        if self._native and logits.dtype == torch.float32 and logits.dim() == 2:
            u = torch.rand((logits.size(0), 1), generator=self._generator, dtype=torch.float64)  # choose's numbers
            tokens = native_top_p(logits.contiguous(), self.cfg.temperature, self.cfg.top_p, u.view(-1).tolist())
        else:
            for process in logits_pipeline(self.cfg, self._seen):
                logits = process(logits)
            picked = choose(logits, self.cfg.temperature, self._generator)
            if self._seen is not None:
                self._seen.scatter_(1, picked[:, None], True)
            tokens = picked.tolist()
        out = {}
        for row, token in zip(self._rows, tokens):
            if token in self._ends:
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
                    *, path: Path = "fast", stop_ids: Collection[int] = ()) -> list[list[int]]:
    """The new tokens for each prompt (a batch of token-id lists of any lengths). Ends each row at
    ``eot_id`` (not included, when ``cfg.stop_at_eot``), at any of ``stop_ids`` (not included) or
    after ``cfg.max_new_tokens``; stop
    strings need text, so ``generate`` and ``stream`` apply them. ``path``: "fast" (default),
    "step", "cached" or "uncached" (the slow reference); all give the same greedy tokens, except
    that in a batch the cached paths slide every row's window together (the context rule)."""
    cfg.validate()
    if not prompt_ids:
        return []
    if cfg.beams > 1:
        return [beam_search(model, ids, cfg, eot_id, path=path, stop_ids=stop_ids) for ids in prompt_ids]
    gen = Generation(model, prompt_ids, cfg, eot_id, path=path, stop_ids=stop_ids)
    while not gen.finished:
        gen.step()
    return gen.tokens

"""Greedy decoding of an ``slm export --format onnx`` folder with onnxruntime: ``OnnxGenerator``.

It follows generation's own rules rather than copies of them: the context rule (``fit_context``,
``slide_window`` from ``runners``) and, for text, slmkit's tokenizer and ``TextStream``
(incremental UTF-8, stop strings), so its greedy tokens and text are those of ``slm generate``.
onnxruntime is an optional extra, imported only when a generator is made.

This module reads what ``slmkit.export`` writes; export imports the folder's metadata name from
here (not the other way round), so generation never imports a later stage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.errors import SlmError
from slmkit.generate.runners import fit_context, slide_window
from slmkit.generate.text import TextStream

META_FILE = "slmkit_export.json"  # in every export folder: format, shapes, eot id
EXTRA_HINT = "pip install 'slmkit[export]'"  # the extra with onnx, onnxruntime and transformers


class OnnxGenerator:
    """Greedy decoding with onnxruntime on an ``slm export --format onnx`` folder; needs only
    onnxruntime, numpy and tokenizers besides slmkit.

    >>> gen = OnnxGenerator("exported/")
    >>> gen.generate_text("Once upon a time", max_new_tokens=50)
    """

    def __init__(self, directory: str | Path, *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise SlmError(f"running ONNX models needs the 'onnxruntime' package: {EXTRA_HINT}") from None
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise SlmError(f"{self.directory} is not an slm export --format onnx folder (no {META_FILE})")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format") != "onnx":
            raise SlmError(f"{self.directory} holds a {self.meta.get('format')!r} export, not onnx")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self._kv = ort.InferenceSession(str(self.directory / "model_kv.onnx"), opts, providers=providers)
        self._opts, self._providers, self._full = opts, providers, None
        self.block_size, self.eot_id = self.meta["block_size"], self.meta["eot_id"]
        self._tok = None

    def empty_past(self, batch: int) -> np.ndarray:
        """A cache of length 0 for ``batch`` rows: pass it as both past_key and past_value to prefill."""
        m = self.meta
        return np.zeros((m["n_layer"], batch, m["n_kv_head"], 0, m["head_dim"]), dtype=np.float32)

    def logits(self, ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Logits (B, T, vocab) of the full-sequence graph ``model.onnx``."""
        if self._full is None:
            import onnxruntime as ort

            self._full = ort.InferenceSession(str(self.directory / "model.onnx"), self._opts, providers=self._providers)
        return self._full.run(["logits"], {"input_ids": np.asarray(ids, dtype=np.int64)})[0]

    def step(self, ids: np.ndarray, past_key: np.ndarray, past_value: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One call of ``model_kv.onnx``: logits (B, T, vocab) and the grown caches."""
        return tuple(self._kv.run(None, {"input_ids": ids, "past_key": past_key, "past_value": past_value}))

    def tokens(self, prompt_ids: Sequence[int], max_new_tokens: int, *, stop_at_eot: bool = True) -> Iterator[int]:
        """Greedy continuation of one prompt, one new token id at a time (the last is
        ``<|endoftext|>`` when it stops there). The prompt is run as one call, then one token per
        call. The context rule is generation's: a prompt longer than the context is cut from the
        left (``fit_context``), and when the cache is full the window slides (``slide_window``)
        into a fresh cache, so every path gives the same tokens."""
        context = fit_context([int(t) for t in prompt_ids], self.block_size, self.eot_id or 0)
        past_k = past_v = self.empty_past(1)
        pending = context
        for _ in range(max_new_tokens):
            logits, past_k, past_v = self.step(np.asarray([pending], dtype=np.int64), past_k, past_v)
            token = int(logits[0, -1].argmax())
            yield token
            if stop_at_eot and token == self.eot_id:
                return
            context.append(token)
            if len(context) > self.block_size:  # the cache is full: slide the window
                context = slide_window(context, self.block_size)
                pending, past_k, past_v = context, self.empty_past(1), self.empty_past(1)
            else:
                pending = [token]

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, stop_at_eot: bool = True) -> list[int]:
        """The new token ids of ``tokens`` as a list (ending with ``<|endoftext|>`` when it stops there)."""
        return list(self.tokens(prompt_ids, max_new_tokens, stop_at_eot=stop_at_eot))

    @property
    def tokenizer(self) -> Any:
        """The export's tokenizer.json as slmkit's ``Tokenizer`` (what ``slm generate`` encodes and
        decodes with: a literal ``<|endoftext|>`` in text is just text)."""
        if self._tok is None:
            from tokenizers import Tokenizer as HFTokenizer

            from slmkit.tokenizer import Tokenizer

            path = self.directory / "tokenizer.json"
            if not path.is_file():
                raise SlmError(f"{self.directory} has no tokenizer.json (exported without a tokenizer): "
                               "pass token ids to generate() instead of text")
            self._tok = Tokenizer("bpe", hf=HFTokenizer.from_file(str(path)))
        return self._tok

    def generate_text(self, prompt: str, max_new_tokens: int = 100, *, stop: Sequence[str] = ()) -> str:
        """Greedy continuation of ``prompt`` as text, as ``slm generate`` gives it: it ends at
        ``<|endoftext|>`` (not included) or right before the first of the ``stop`` strings, and
        the text is decoded incrementally (``TextStream``)."""
        text = TextStream(self.tokenizer, list(stop))
        pieces = []
        for token in self.tokens(self.tokenizer.encode(prompt), max_new_tokens):
            if token == self.eot_id:
                break
            pieces.append(text.push(token))
            if text.stopped:
                break
        return "".join(pieces) + text.finish()


__all__ = ["EXTRA_HINT", "META_FILE", "OnnxGenerator"]

"""Greedy decoding of an ``slm export --format onnx`` folder with onnxruntime (interim home)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from slmkit.errors import SlmError
from slmkit.export.common import META_FILE, require


class OnnxGenerator:
    """Greedy decoding with onnxruntime on an ``slm export --format onnx`` folder; needs only
    onnxruntime, numpy and tokenizers.

    >>> gen = OnnxGenerator("exported/")
    >>> gen.generate_text("Once upon a time", max_new_tokens=50)
    """

    def __init__(self, directory: str | Path, *, threads: int | None = None) -> None:
        ort = require("onnxruntime", "running ONNX models")
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

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, stop_at_eot: bool = True) -> list[int]:
        """Greedy continuation of one prompt: the new token ids (ending with ``<|endoftext|>``
        when it stops there). The prompt is run as one call, then one token per call. The context
        rule is slmkit's own (``slmkit.generate``): a prompt longer than the context is cut from
        the left, and when the cache is full the last ``block_size // 2`` tokens are prefilled
        into a fresh cache, so every path gives the same tokens."""
        from slmkit.generate import fit_context, slide_window

        context = fit_context([int(t) for t in prompt_ids], self.block_size, self.eot_id or 0)
        new: list[int] = []
        past_k = past_v = self.empty_past(1)
        pending = context
        for _ in range(max_new_tokens):
            logits, past_k, past_v = self.step(np.asarray([pending], dtype=np.int64), past_k, past_v)
            token = int(logits[0, -1].argmax())
            new.append(token)
            if stop_at_eot and token == self.eot_id:
                break
            context.append(token)
            if len(context) > self.block_size:  # the cache is full: slide the window
                context = slide_window(context, self.block_size)
                pending, past_k, past_v = context, self.empty_past(1), self.empty_past(1)
            else:
                pending = [token]
        return new

    @property
    def tokenizer(self) -> Any:
        """The export's tokenizer.json as a ``tokenizers.Tokenizer``."""
        if self._tok is None:
            from tokenizers import Tokenizer as HFTokenizer

            self._tok = HFTokenizer.from_file(str(self.directory / "tokenizer.json"))
            self._tok.encode_special_tokens = True  # as slmkit: "<|endoftext|>" in text is just text
        return self._tok

    def generate_text(self, prompt: str, max_new_tokens: int = 100) -> str:
        """Greedy continuation of ``prompt`` as text (stops at ``<|endoftext|>``)."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        new = self.generate(ids, max_new_tokens)
        if new and new[-1] == self.eot_id:
            new = new[:-1]
        return self.tokenizer.decode(new, skip_special_tokens=False)

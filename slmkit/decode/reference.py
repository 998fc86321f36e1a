"""The reference decoder: the model's own forward over the cache. It runs every model."""

from __future__ import annotations

import torch

from slmkit.decode.base import Decoder
from slmkit.model import Cache


class ModuleDecoder(Decoder):
    """``model.forward`` with the KV cache, one token per row per step: the math of ``model.py``
    through its modules (so also int8-quantized or wrapped linear layers, any dtype or device,
    every config field). The slowest backend with a cache, and the one the others are tested
    against."""

    name = "cached"
    plain_linears = False

    @classmethod
    def why_not(cls, model, device=None, dtype=None) -> str | None:  # noqa: ANN001
        return None  # the reference implements everything model.py does

    def step(self, ids: torch.Tensor, cache: Cache, need: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(ids[:, None], last_only=True, cache=cache)[0][:, -1]


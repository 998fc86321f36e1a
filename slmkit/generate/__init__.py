"""Generation: continue text with a trained model, the right way, in plain Python.

Read in this order:

1. ``sampling``: ``SamplingConfig`` (every decoding option, checked before any work starts), one
   small logits processor per method, chained into a pipeline, then greedy argmax or a seeded draw.
2. ``runners``: how the model is run (KV cache or the uncached reference), and the context rule
   (``fit_context``, ``slide_window``) every generation path follows.
3. ``generation``: ``Generation``, a batch of prompts continued one token per step;
   ``generate_tokens`` on top.
4. ``beam``: ``beam_search``, the most likely continuation instead of a sample.
5. ``text``: ``TextStream`` turns tokens into printable pieces (incremental UTF-8, stop strings);
   ``generate`` and ``stream`` are the text API.
6. ``cli``: ``slm generate`` and ``slm chat``.
"""

from slmkit.generate.beam import beam_search
from slmkit.generate.generation import Generation, generate_tokens
from slmkit.generate.runners import CachedRunner, Path, UncachedRunner, fit_context, make_runner, slide_window
from slmkit.generate.sampling import (
    Processor, SamplingConfig, apply_min_p, apply_repetition_penalty, apply_temperature, apply_top_k,
    apply_top_k_top_p, apply_top_p, choose, logits_pipeline, make_generator,
)
from slmkit.generate.text import TextStream, generate, stream

__all__ = [
    "CachedRunner", "Generation", "Path", "Processor", "SamplingConfig", "TextStream", "UncachedRunner",
    "apply_min_p", "apply_repetition_penalty", "apply_temperature", "apply_top_k", "apply_top_k_top_p",
    "apply_top_p", "beam_search", "choose", "fit_context", "generate", "generate_tokens", "logits_pipeline",
    "make_generator", "make_runner", "slide_window", "stream",
]

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
   ``generate``, ``stream`` and ``stream_ids`` are the text API.
6. ``conversation``: a chat model's reply to ``(role, content)`` turns with the run's chat template
   (``ChatSession`` renders and fits the turns to the context, ``stream_reply``/``reply`` generate
   up to the end-of-turn token).
7. ``prefix`` and ``continuous``: ``PrefixCache`` (keys and values of prompt prefixes, found again by
   their tokens) and ``ContinuousBatch`` (sequences join and leave a running batch: ``slm serve``).
8. ``cli``: ``slm generate`` and ``slm chat``.
"""

from slmkit.generate.beam import beam_search
from slmkit.generate.generation import Generation, generate_tokens
from slmkit.generate.runners import CachedRunner, Path, UncachedRunner, fit_context, make_runner, slide_window
from slmkit.generate.sampling import (
    Processor, SamplingConfig, apply_min_p, apply_repetition_penalty, apply_temperature, apply_top_k,
    apply_top_k_top_p, apply_top_p, choose, logits_pipeline, make_generator,
)
from slmkit.generate.text import TextStream, generate, stream, stream_ids
from slmkit.generate.conversation import ChatSession, Prompt, reply, stream_reply

__all__ = [
    "CachedRunner", "ChatSession", "Generation", "Prompt", "Path", "Processor", "SamplingConfig", "TextStream", "UncachedRunner",
    "apply_min_p", "apply_repetition_penalty", "apply_temperature", "apply_top_k", "apply_top_k_top_p",
    "apply_top_p", "beam_search", "choose", "fit_context", "generate", "generate_tokens", "logits_pipeline",
    "make_generator", "make_runner", "reply", "slide_window", "stream", "stream_ids", "stream_reply",
]

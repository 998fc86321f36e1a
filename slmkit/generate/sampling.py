"""Sampling: every decoding option (``SamplingConfig``), the logits processors, and the draw.

One small pure function per method (repetition penalty, temperature, top-k, top-p, min-p), chained
into a pipeline in Hugging Face's order, then greedy argmax or a seeded draw (``choose``).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from slmkit.errors import SlmError

# --- options --------------------------------------------------------------------------------------


def _unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` typed on the command line, as the characters."""
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


@dataclass
class SamplingConfig:
    """How to pick each next token: the ``[sample]`` section of a config file, and the flags of
    ``slm generate`` and ``slm chat`` (made from these fields by ``config.add_section_arguments``).
    The defaults suit a small story model."""

    max_new_tokens: int = field(default=200, metadata={"help": "tokens to generate at most (default %(default)s)"})
    temperature: float = field(default=0.8, metadata={"help": "0 = greedy; higher = more random (default %(default)s)"})
    top_k: int | None = field(default=200, metadata={  # None or 0 = off
        "help": "sample among the k most likely tokens; 0 = off (default %(default)s)"})
    top_p: float = field(default=0.95, metadata={
        "help": "nucleus: smallest set with this much probability; 1 = off (default %(default)s)"})
    min_p: float = field(default=0.0, metadata={
        "help": "drop tokens below min-p x the top probability; 0 = off (default %(default)s)"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "> 1 discourages tokens already in the context; 1 = off (default %(default)s)"})
    stop: list[str] = field(default_factory=list, metadata={  # the text ends before the first of these
        "help": "end at the first of these strings (\\n and \\t understood)", "metavar": "STR", "parse": _unescape})
    stop_at_eot: bool = field(default=True, metadata={
        "help": "do not stop at <|endoftext|>: run on to --max-new-tokens", "flag": "--no-stop"})
    seed: int | None = field(default=None, metadata={"help": "random seed: the same seed gives the same text"})
    beams: int = field(default=1, metadata={"help": "beam search with N beams: the most likely text, not a sample"})
    length_penalty: float = field(default=1.0, metadata={  # score = log-prob / length ** length_penalty
        "help": "beam search: > 1 favours longer texts, < 1 shorter (default %(default)s)"})

    def validate(self) -> None:
        """Raise SlmError for an out-of-range value, naming the option and the allowed range."""
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k is None or self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1] (0 = off), got {self.min_p}"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty, got {self.stop!r}"),
            (self.seed is None or self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.beams >= 1, f"beams must be at least 1, got {self.beams}"),
            (math.isfinite(self.length_penalty), f"length_penalty must be a finite number, got {self.length_penalty}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SlmError(message)


# --- logits processors: (B, vocab) logits in, the same shape out ---------------------------------

Processor = Callable[[torch.Tensor], torch.Tensor]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019), as in Hugging Face: for every token already in the
    context (``seen``, a (B, vocab) bool mask), divide a positive logit by ``penalty`` and multiply
    a negative one by it, so that penalty > 1 always makes the token less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen (< 1) or flatten (> 1) the distribution."""
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits of each row (ties broken by torch.topk)."""
    if k >= logits.size(-1):
        return logits
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, -math.inf).scatter_(-1, indices, values)


NUCLEUS_FIRST = 64  # apply_top_p looks for the nucleus among this many tokens first, then 8x as many


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the most likely tokens until their
    probabilities add up to at least ``p``; the most likely token always stays.

    The nucleus of a trained model is usually a few tokens: it is looked for among the
    ``NUCLEUS_FIRST`` largest logits (a ``topk`` about 10x cheaper than sorting a 4k vocabulary),
    with probabilities from the whole row's softmax; rows whose nucleus is larger than that (flat
    distributions) look among 8x as many, and only rows still wider take the sort,
    ``apply_top_k_top_p`` over the whole vocabulary. All keep the same tokens (tested), up to a
    float rounding of a probability sum landing exactly on ``p``."""
    vocab = logits.size(-1)
    if vocab <= 4 * NUCLEUS_FIRST:
        return apply_top_k_top_p(logits, vocab, p)  # top-k of the whole vocabulary is a sort
    out = logits  # replaced by a tensor of -inf once some rows need a wider look
    todo = torch.arange(logits.size(0), device=logits.device)  # rows whose nucleus is not found yet
    x, log_total = logits, logits.logsumexp(dim=-1, keepdim=True)
    for k in (NUCLEUS_FIRST, 8 * NUCLEUS_FIRST):
        if 2 * k > vocab:
            break
        values, indices = x.topk(k, dim=-1)
        probs = (values - log_total).exp()
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        found = before[:, -1] >= p
        kept = torch.full_like(x, -math.inf).scatter_(-1, indices, values.masked_fill(before >= p, -math.inf))
        if bool(found.all()):
            if x is logits:
                return kept
            out[todo] = kept
            return out
        if out is logits:
            out = torch.full_like(logits, -math.inf)
        out[todo[found]] = kept[found]
        todo, x, log_total = todo[~found], x[~found], log_total[~found]
    out[todo] = apply_top_k_top_p(x, vocab, p)
    return out


def apply_top_k_top_p(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """``apply_top_p(apply_top_k(logits, k), p)`` with one ``topk`` instead of a sort of the whole
    vocabulary (the nucleus is taken among the k largest, which ``topk`` returns in order)."""
    values, indices = logits.topk(min(k, logits.size(-1)), dim=-1)
    probs = values.softmax(dim=-1)
    values = values.masked_fill(probs.cumsum(dim=-1) - probs >= p, -math.inf)
    return torch.full_like(logits, -math.inf).scatter_(-1, indices, values)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): drop tokens whose probability is below ``min_p`` times
    the most likely token's, a cut that adapts to how confident the model is."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -math.inf)


def apply_logit_bias(logits: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """OpenAI's ``logit_bias``: add ``bias[i]`` to the logit of token ``ids[i]`` in every row
    (-100 bans a token in practice, +100 all but forces it)."""
    return logits.index_add(-1, ids, bias.to(logits.dtype).expand(logits.size(0), -1))


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties on the tokens generated so far (``counts``, (B, vocab) how often each
    appeared): subtract ``presence`` once for every token that appeared and ``frequency`` times
    its count, so positive values make repeats less likely."""
    return logits - (counts > 0).to(logits.dtype) * presence - counts.to(logits.dtype) * frequency


def apply_ban(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Make tokens ``ids`` impossible (``min_tokens``: no end token before that many tokens)."""
    return logits.index_fill(-1, ids, -math.inf)


def logits_pipeline(cfg: SamplingConfig, seen: torch.Tensor | None = None) -> list[Processor]:
    """The processors ``cfg`` switches on, in Hugging Face's order. Greedy decoding (temperature 0)
    keeps only the repetition penalty: the others never change the argmax."""
    steps: list[Processor] = []
    if cfg.repetition_penalty != 1.0 and seen is not None:
        steps.append(partial(apply_repetition_penalty, seen=seen, penalty=cfg.repetition_penalty))
    if cfg.temperature == 0:
        return steps
    if cfg.temperature != 1.0:
        steps.append(partial(apply_temperature, temperature=cfg.temperature))
    if cfg.top_k and cfg.top_p < 1.0:
        steps.append(partial(apply_top_k_top_p, k=cfg.top_k, p=cfg.top_p))
    elif cfg.top_k:
        steps.append(partial(apply_top_k, k=cfg.top_k))
    elif cfg.top_p < 1.0:
        steps.append(partial(apply_top_p, p=cfg.top_p))
    if cfg.min_p > 0:
        steps.append(partial(apply_min_p, min_p=cfg.min_p))
    return steps


def choose(logits: torch.Tensor, temperature: float,
           generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """The next token of each row (B,): the argmax when greedy, else a draw from the softmax.

    The draw inverts the cumulative distribution with one uniform number per row: exact, and on
    a CPU about 10x cheaper than ``torch.multinomial`` over a 4k vocabulary (14 vs 180 us a step).
    ``generator`` may be a list, one per row (a server's requests each follow their own seed): row
    b then draws exactly what it would draw alone with its generator."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # float64 sums keep even a one-in-a-million token's share of [0, 1) right (MPS has no float64)
    dtype = torch.float32 if logits.device.type == "mps" else torch.float64
    cdf = logits.softmax(dim=-1, dtype=dtype).cumsum(dim=-1)
    total = cdf[:, -1:]
    if isinstance(generator, list):
        u = torch.cat([torch.rand((1, 1), generator=g, dtype=dtype, device=logits.device) for g in generator]) * total
    else:
        u = torch.rand(total.shape, generator=generator, dtype=dtype, device=logits.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total: never a p = 0 token
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def native_top_p(logits: torch.Tensor, temperature: float, p: float, u: list[float],
                 rows: list[int] | None = None, threads: int | None = None) -> list[int] | None:
    """``choose(apply_top_p(apply_temperature(logits[rows], temperature), p), temperature, gens)``
    in one C++ call for the whole batch (``csrc/sample.cpp``): ``u`` holds the float64 number each
    row's generator gives ``choose`` (``torch.rand((1, 1), generator=g, dtype=torch.float64)``;
    drawn ahead, ``torch.rand(n, ...)`` gives the same numbers), ``rows`` the rows of ``logits``
    (B, vocab) to sample (all by default). The same tokens as the reference (tested), up to the
    float rounding of a probability sum landing exactly on ``p`` and the order of logits tied at
    the nucleus's edge (the lower id stays; ``topk``'s order is unspecified). A serving step's
    sampling went from a ``topk`` (a sort of the vocabulary for wide rows, about 200 us a row)
    and a float64 softmax per step to a few microseconds a row, with no PyTorch call (each lets
    go of the GIL, which a server's event loop then holds for its whole turn). The rows run on
    ``threads`` threads (default ``torch.get_num_threads()``; the C++ decode step's pool), which
    change no token.

    Supports contiguous float32 CPU logits, ``temperature`` > 0 and ``p`` in (0, 1]; None
    elsewhere, or without the C++ library (``native_sampling``): the caller takes the reference."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2 \
            or not logits.is_contiguous() or not 0 < p <= 1 or not temperature > 0:
        return None
    sample_rows = _sample_rows()
    if sample_rows is None:
        return None
    rows = list(range(logits.size(0))) if rows is None else rows
    n = len(rows)
    out = (ctypes.c_int64 * n)()
    sample_rows(logits.data_ptr(), logits.size(1), n, (ctypes.c_int64 * n)(*rows), temperature, p,
                (ctypes.c_double * n)(*u), out, threads or torch.get_num_threads())
    return list(out)


@functools.cache
def _sample_rows() -> Callable | None:
    """The C++ ``slm_sample_rows`` (looked up once: a server calls it every decode step), or None
    without slmkit's C++ library."""
    from slmkit import cpu_kernels

    lib = cpu_kernels.library()
    return None if lib is None else lib.slm_sample_rows


def native_sampling(device: torch.device) -> bool:
    """Whether ``native_top_p`` runs on ``device`` here (a CPU, with slmkit's C++ library built)."""
    return device.type == "cpu" and _sample_rows() is not None


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A private random stream, so a seed reproduces a sample without touching global state."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _seen_mask(contexts: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    seen = torch.zeros(len(contexts), vocab_size, dtype=torch.bool, device=device)
    for row, context in enumerate(contexts):
        seen[row, torch.tensor(context, device=device)] = True
    return seen

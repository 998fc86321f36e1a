"""Beam search: the most likely continuation instead of a sample."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

import torch

from slmkit.generate.runners import Path, _device_dtype, fit_context, make_runner
from slmkit.generate.sampling import SamplingConfig, _seen_mask, apply_repetition_penalty

@torch.inference_mode()
def beam_search(model, prompt_ids: list[int], cfg: SamplingConfig, eot_id: int | None = None, *,
                is_finished: Callable[[list[int]], bool] | None = None, path: Path = "fast",
                stop_ids: Collection[int] = ()) -> list[int]:
    """The most likely continuation of one prompt, by beam search with ``cfg.beams`` beams.

    Hugging Face's beam search (``generate(num_beams=N, do_sample=False)`` with its default
    ``early_stopping=False``), step for step:

    * A beam's score is the sum of its tokens' log-probabilities. The repetition penalty acts on
      each step's log-probabilities (all <= 0, so a seen token's is multiplied by the penalty),
      not on the logits before the softmax.
    * Each step takes the ``2 * beams`` best extensions of all beams. A candidate is finished at
      ``<|endoftext|>`` (when ``cfg.stop_at_eot``; not included), at one of ``stop_ids`` (a chat
      template's end of turn; not included), when ``is_finished(tokens)``
      is true (``generate`` passes the stop strings), or at ``max_new_tokens``; only the
      ``beams`` best candidates may finish (the rest are spares), and the best unfinished ones go
      on as the new beams.
    * Finished hypotheses are ranked by score / length ** ``length_penalty`` (the length counts
      the end token: > 1 favours longer, < 1 shorter), and the ``beams`` best are kept.
    * The search ends when ``beams`` hypotheses are finished and the best live beam, at its
      current length, scores no better than the worst of them.

    Deterministic: temperature, top-k, top-p, min-p and the seed do not apply.
    """
    cfg.validate()
    n, lp = cfg.beams, cfg.length_penalty
    ends = set(stop_ids) | ({eot_id} if cfg.stop_at_eot and eot_id is not None else set())
    device, _ = _device_dtype(model)
    context = fit_context(prompt_ids, model.config.block_size, eot_id)
    runner = make_runner(path, model, [context], cfg.max_new_tokens)
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1, device=device)  # sum of log-probs of each live beam
    seen = _seen_mask([context], runner.logits.size(-1), device) if cfg.repetition_penalty != 1.0 else None
    finished: list[tuple[float, list[int]]] = []  # the n best (normalized score, tokens), best first

    for step in range(1, cfg.max_new_tokens + 1):
        logprobs = runner.logits.log_softmax(dim=-1)
        if seen is not None:  # after the softmax, as Hugging Face's beam search runs its processors
            logprobs = apply_repetition_penalty(logprobs, seen, cfg.repetition_penalty)
        candidates = scores[:, None] + logprobs  # (beams, vocab)
        vocab = candidates.size(-1)
        top, flat = candidates.view(-1).topk(min(2 * n, candidates.numel()))
        rows, tokens, new_scores, new_beams = [], [], [], []
        for rank, (score, index) in enumerate(zip(top.tolist(), flat.tolist())):
            if score == -math.inf:
                break
            row, token = divmod(index, vocab)
            at_eot = token in ends
            sequence = beams[row] if at_eot else beams[row] + [token]
            if at_eot or step == cfg.max_new_tokens or (is_finished is not None and is_finished(sequence)):
                if rank < n:  # lower ones are spares, there only so that n beams can go on
                    finished.append((score / step**lp, sequence))
            elif len(new_beams) < n:
                rows.append(row)
                tokens.append(token)
                new_scores.append(score)
                new_beams.append(sequence)
        finished = sorted(finished, key=lambda f: f[0], reverse=True)[:n]
        if not new_beams:  # the last step, or every candidate finished
            break
        if len(finished) == n and max(new_scores) / step**lp <= finished[-1][0]:
            break  # Hugging Face's stopping rule: the live beams are taken to be unable to win
        beams, scores = new_beams, torch.tensor(new_scores, device=device)
        runner.select(rows)
        runner.advance(tokens)
        if seen is not None:
            seen = seen[torch.tensor(rows, device=device)]
            seen[torch.arange(len(rows), device=device), torch.tensor(tokens, device=device)] = True
    return finished[0][1] if finished else []

"""The fused vocabulary head + cross-entropy of training: the model's loss, computed chunk by chunk.

``GPT.forward(idx, targets, return_logits=False)`` calls it instead of making the full (tokens,
vocab) logits. It is a fast path of ``F.cross_entropy(h @ weight.T, targets)``, kept out of
``model.py`` so the model stays the readable reference; on a CPU, in float32 or under bf16
autocast, its loop runs in C++ (``cpu_kernels.head_loss``).
"""

from __future__ import annotations

import torch

from slmkit import cpu_kernels


def ce_chunk_rows(h: torch.Tensor, vocab_size: int) -> int:
    """Rows per chunk of the fused head + cross-entropy: about 2 MB of fp32 logits on a CPU, so a
    chunk stays in a core's L2 cache; 64 MB on a GPU, where launches cost more than memory."""
    budget = (64 << 20) if h.is_cuda else (2 << 20)
    return max(16, budget // (4 * vocab_size))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (-1 ignored), chunk by chunk.

    The vocabulary projection and its loss are the largest activation of a small model: (tokens,
    vocab) logits, written, read by log-softmax, written again as their gradient. Here each chunk
    of rows makes its logits, its loss and at once its gradients for ``h`` and ``weight``, while the
    chunk is still in cache; backward only scales the stored gradients. Same result as
    ``F.cross_entropy(h @ weight.T, targets)`` up to float rounding.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        if cpu_kernels.head_loss_usable(h, weight):  # on a CPU: the same loop, in C++ and eager
            # Under bf16 autocast the kernel gets bf16 copies: bf16 multiplies, a float32 loss.
            on = torch.is_autocast_enabled("cpu")
            cdt = torch.get_autocast_dtype("cpu") if on else h.dtype
            loss, grad_h, grad_w = cpu_kernels.head_loss(h.to(cdt), weight.to(cdt), targets, chunk)
            ctx.save_for_backward(grad_h.to(h.dtype), grad_w.to(weight.dtype))
            return loss
        # Under autocast, run the matmuls in the autocast dtype and the softmax in fp32, as F.linear
        # followed by logits.float() would.
        device = h.device.type
        cdt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            w = weight.to(cdt)
            acc = torch.promote_types(cdt, torch.float32)  # fp32, or fp64 for gradcheck
            valid = targets != -1
            safe = targets.clamp(min=0)[:, None]
            count = valid.sum().clamp(min=1)
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            loss = torch.zeros((), dtype=acc, device=h.device)
            for s in range(0, h.shape[0], chunk):
                hs = h[s : s + chunk].to(cdt)
                logits = (hs @ w.t()).to(acc)
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                keep = valid[s : s + chunk, None].to(acc)
                loss = loss + ((lse - logits.gather(1, safe[s : s + chunk])) * keep).sum()
                # d loss / d logits = (softmax - onehot) / count, on the kept rows only
                p = logits.sub_(lse).exp_()
                p.scatter_add_(1, safe[s : s + chunk], -keep)
                p = p.mul_(keep / count).to(cdt)
                grad_h[s : s + chunk] = (p @ w).to(h.dtype)
                grad_w += (p.t() @ hs).to(acc)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None

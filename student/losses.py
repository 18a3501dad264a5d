"""Distillation losses against sparse (top-k) teacher targets, and CE on the response.

All functions take the student's logits at the response positions (B, T, V),
the cached teacher top-k `teacher_ids` (B, T, k) / `teacher_logprobs` (B, T, k),
the teacher's `tail_logmass` (B, T) and a `mask` (B, T) of real positions, and
return the sum over real positions divided by `normalizer` (default: their
count, i.e. the mean). Distributed training passes the global count of real
positions (over ranks and accumulation steps) / world size, so that summed
gradients equal one process's on the whole batch.

Padding cannot turn into NaN: padded positions are filled with finite values
(`masked_fill`) before anything is multiplied or exponentiated, whatever the
padding value (0 or -inf), and teacher log-probs are floored at MIN_LOGPROB.

  forward_kl_topk   KL(p_T || p_S) over the top-k ids, both renormalized to them
  forward_kl_tail   KL over k+1 buckets: the top-k ids and one "everything else"
                    bucket (teacher: its tail mass; student: 1 - its top-k mass)
  reverse_kl_topk   KL(p_S || p_T) over the top-k ids, both renormalized

With temperature tau both sides are softened: teacher log-probs / tau and
student logits / tau (for the tail bucket the teacher's tail log-mass / tau, the
same softening of one merged bucket). With k = vocabulary size every variant
equals its dense full-vocabulary counterpart (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


MIN_LOGPROB = -1e4  # a teacher log-prob of -inf (an impossible token) is floored here: exp() is exactly 0


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor, normalizer=None) -> torch.Tensor:
    total = per_position.masked_fill(~mask.bool(), 0.0).sum()
    denom = mask.sum().clamp_min(1) if normalizer is None else normalizer
    return total / denom


def _clean_teacher(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Teacher log-probs (B, T, k) or log-masses (B, T) with padded positions set to 0 and -inf floored."""
    m = mask.bool() if values.dim() == mask.dim() else mask.bool().unsqueeze(-1)
    return values.float().masked_fill(~m, 0.0).clamp_min(MIN_LOGPROB)


def _teacher_topk(teacher_logprobs: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Renormalized teacher log-probs over its top-k at temperature tau."""
    lp = _clean_teacher(teacher_logprobs, mask) / tau
    return lp - torch.logsumexp(lp, dim=-1, keepdim=True)


def _student_topk(student_logits: torch.Tensor, teacher_ids: torch.Tensor, tau: float) -> torch.Tensor:
    """Student log-probs at temperature tau, renormalized over the teacher's top-k ids."""
    s = torch.gather(student_logits.float() / tau, -1, teacher_ids)
    return s - torch.logsumexp(s, dim=-1, keepdim=True)


def forward_kl_topk(student_logits, teacher_ids, teacher_logprobs, mask, tau: float = 1.0, normalizer=None,
                    **_) -> torch.Tensor:  # fmt: skip
    t, s = _teacher_topk(teacher_logprobs, mask, tau), _student_topk(student_logits, teacher_ids, tau)
    return _masked_mean((t.exp() * (t - s)).sum(-1), mask, normalizer)


def reverse_kl_topk(student_logits, teacher_ids, teacher_logprobs, mask, tau: float = 1.0, normalizer=None,
                    **_) -> torch.Tensor:  # fmt: skip
    t, s = _teacher_topk(teacher_logprobs, mask, tau), _student_topk(student_logits, teacher_ids, tau)
    return _masked_mean((s.exp() * (s - t)).sum(-1), mask, normalizer)


def forward_kl_tail(
    student_logits, teacher_ids, teacher_logprobs, mask, tau: float = 1.0, tail_logmass=None, normalizer=None, **_
) -> torch.Tensor:
    if tail_logmass is None:
        raise ValueError("forward_kl_tail needs the teacher's tail_logmass")
    # Teacher buckets: top-k and tail, softened together and renormalized.
    t = torch.cat([_clean_teacher(teacher_logprobs, mask), _clean_teacher(tail_logmass, mask).unsqueeze(-1)],
                  dim=-1) / tau  # fmt: skip
    t = t - torch.logsumexp(t, dim=-1, keepdim=True)
    # Student buckets: full-softmax mass on the top-k ids, and the rest.
    s_all = torch.log_softmax(student_logits.float() / tau, dim=-1)
    s_top = torch.gather(s_all, -1, teacher_ids)
    s_tail = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))
    s = torch.cat([s_top, s_tail.unsqueeze(-1)], dim=-1)
    p = t.exp()
    kl = torch.where(p > 0, p * (t - s), torch.zeros_like(p)).sum(-1)
    return _masked_mean(kl, mask, normalizer)


def response_ce(student_logits: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor,
                normalizer=None) -> torch.Tensor:  # fmt: skip
    """Cross-entropy of the response tokens (the teacher-written or dataset response)."""
    ce = F.cross_entropy(student_logits.float().transpose(1, 2), target_ids, reduction="none")
    return _masked_mean(ce, mask, normalizer)


def sampled_ce(student_logits, sample_ids, sample_counts, mask, tau: float = 1.0, normalizer=None, **_) -> torch.Tensor:
    """Random-sampling KD (RS-KD, arXiv 2503.16870) against ids drawn from the teacher's full distribution at
    temperature tau: `sample_ids` (B, T, m) the distinct ids drawn at each position, `sample_counts` (B, T, m) how
    often each was drawn (0 for padding slots). Per position -sum_i (c_i / N) log q_tau(i), with q the student's
    full-vocabulary softmax at tau: an unbiased estimate of the cross-entropy H(p_tau, q_tau) = KL(p_tau || q_tau) +
    H(p_tau), so its gradient is the forward KL's without the top-k truncation's bias (tested against the dense
    value in expectation). Fed by a `--targets sampled` cache (pipeline.cache.decode_sampled, student.data.collate)."""
    counts = sample_counts.float().masked_fill(~mask.bool().unsqueeze(-1), 0.0)
    weights = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    logq = torch.log_softmax(student_logits.float() / tau, -1)
    per_position = -(weights * torch.gather(logq, -1, sample_ids)).sum(-1)
    return _masked_mean(per_position, mask, normalizer)


# --kd: the top-k losses, and sampled_ce for a sampled cache
KD_LOSSES = {"forward_kl": forward_kl_topk, "forward_kl_tail": forward_kl_tail, "reverse_kl": reverse_kl_topk,
             "sampled": sampled_ce}


# Dense references (full vocabulary), for tests.
def dense_forward_kl(student_logits, teacher_logits, mask, tau: float = 1.0):
    t = torch.log_softmax(teacher_logits.float() / tau, -1)
    s = torch.log_softmax(student_logits.float() / tau, -1)
    return _masked_mean((t.exp() * (t - s)).sum(-1), mask)


def dense_ce(student_logits, teacher_logits, mask, tau: float = 1.0):
    t = torch.log_softmax(teacher_logits.float() / tau, -1)
    s = torch.log_softmax(student_logits.float() / tau, -1)
    return _masked_mean(-(t.exp() * s).sum(-1), mask)


def dense_reverse_kl(student_logits, teacher_logits, mask, tau: float = 1.0):
    t = torch.log_softmax(teacher_logits.float() / tau, -1)
    s = torch.log_softmax(student_logits.float() / tau, -1)
    return _masked_mean((s.exp() * (s - t)).sum(-1), mask)


# --- the LM head and the losses in chunks of positions ---------------------------------------------------------


def response_losses(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None, mask: torch.Tensor,
                    targets: dict | None, kd=None, response_ids: torch.Tensor | None = None, tau: float = 1.0,
                    normalizer=None, chunk: int = 512) -> dict[str, torch.Tensor]:  # fmt: skip
    """The KD and CE terms of one channel from the student's last hidden states at the response positions, with
    the LM head applied here, `chunk` real positions at a time: only one chunk's logits (chunk x vocabulary) exist
    at once, forward and backward (each chunk's head + loss is recomputed in the backward pass, activation
    checkpointing), so the loss's peak memory is bounded by the chunk, not by batch x positions x vocabulary (at a
    152k vocabulary, 4096 positions of fp32 logits are 2.5 GB, and log_softmax and its gradient as much again).

    hidden (B, T, H) at the response positions; head_weight (V, H) (and bias); mask (B, T) the real positions;
    `targets`: the KD targets (`teacher_ids`, `teacher_logprobs`, `tail_logmass` of a top-k cache, or
    `sample_ids`, `sample_counts` of a sampled one), each (B, T, ...), with `kd` the loss function (KD_LOSSES) or
    None for no KD; `response_ids` (B, T) for CE, or None. Returns {"kd": ..., "ce": ...} for those asked, each the
    sum over real positions divided by `normalizer` (their count by default): the same values and gradients as the
    losses on the whole (B, T, V) logits (tested), and padding is never computed at all. `chunk` <= 0: no chunks.
    """
    from torch.utils.checkpoint import checkpoint

    keep = mask.bool()
    denom = keep.sum().clamp_min(1) if normalizer is None else normalizer
    h = hidden[keep]  # (N, H): the real positions only
    picked = {name: value[keep] for name, value in (targets or {}).items() if value is not None}
    ids = response_ids[keep] if response_ids is not None else None
    n = h.shape[0]
    wanted = [name for name, on in (("kd", kd is not None), ("ce", ids is not None)) if on]
    if not wanted or n == 0:
        zero = hidden.sum() * 0.0 + head_weight.sum() * 0.0  # keeps the graph (and DDP's bookkeeping) connected
        return {name: zero for name in wanted}
    step = n if chunk <= 0 else chunk
    names = sorted(picked)

    def chunk_terms(h_c, ids_c, *values):
        logits = F.linear(h_c, head_weight, head_bias)[None]  # (1, c, V)
        ones = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        out = []
        if kd is not None:
            out.append(kd(logits, **{k: v[None] for k, v in zip(names, values)}, mask=ones, tau=tau, normalizer=denom))
        if ids_c is not None:
            out.append(response_ce(logits, ids_c[None], ones, denom))
        return torch.stack(out)

    total = None
    for start in range(0, n, step):
        sl = slice(start, start + step)
        args = (h[sl], ids[sl] if ids is not None else None, *(picked[k][sl] for k in names))
        part = chunk_terms(*args) if chunk <= 0 else checkpoint(chunk_terms, *args, use_reentrant=False)
        total = part if total is None else total + part
    return dict(zip(wanted, (t.clone() for t in total.unbind(0))))  # not views: a wrapper may register hooks on them

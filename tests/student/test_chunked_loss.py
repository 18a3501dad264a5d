"""The LM head and the KD/CE losses in chunks of positions: the same values and gradients as on the whole logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from student.losses import KD_LOSSES, response_ce, response_losses


def _batch(B=3, T=9, H=16, V=50, k=6, seed=0, sampled=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g, requires_grad=True)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate((T, 5, 2)[:B]):
        mask[b, :n] = True
    ids = torch.randint(0, V, (B, T), generator=g)
    if sampled:
        targets = {"sample_ids": torch.randint(0, V, (B, T, k), generator=g),
                   "sample_counts": torch.randint(0, 4, (B, T, k), generator=g).float()}  # fmt: skip
    else:
        top = torch.randn(B, T, V, generator=g).log_softmax(-1).topk(k, -1)
        targets = {"teacher_ids": top.indices, "teacher_logprobs": top.values,
                   "tail_logmass": torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))}  # fmt: skip
    # padded positions hold garbage: the losses must not see it
    hidden.data[~mask] = 1e6
    return hidden, weight, bias, mask, ids, targets


@pytest.mark.parametrize("kd", ["forward_kl", "forward_kl_tail", "reverse_kl", "sampled"])
@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_chunked_losses_equal_the_losses_on_the_whole_logits(kd, chunk):
    hidden, weight, bias, mask, ids, targets = _batch(sampled=kd == "sampled")
    fn, tau, norm = KD_LOSSES[kd], 2.0, 7.5
    # reference: the whole (B, T, V) logits, as the student computed them before chunking
    logits = F.linear(hidden.masked_fill(~mask[..., None], 0.0), weight, bias)
    ref_kd = fn(logits, **targets, mask=mask, tau=tau, normalizer=norm)
    ref_ce = response_ce(logits, ids, mask, norm)
    ref_grads = torch.autograd.grad(ref_kd + 0.3 * ref_ce, (hidden, weight, bias))
    got = response_losses(hidden, weight, bias, mask, targets, fn, ids, tau, norm, chunk=chunk)
    grads = torch.autograd.grad(got["kd"] + 0.3 * got["ce"], (hidden, weight, bias))
    torch.testing.assert_close(got["kd"], ref_kd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["ce"], ref_ce, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[0][~mask].abs().max() == 0  # padding gets no gradient


def test_chunks_hold_one_chunk_of_logits_at_a_time():
    """The saved activations of the chunked loss do not grow with the positions (the head and loss are recomputed in
    the backward pass); the whole-logits path saves every position's vocabulary row."""
    hidden, weight, bias, mask, ids, targets = _batch(B=4, T=64, V=4000)
    mask[:] = True
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        response_losses(hidden, weight, bias, mask, targets, KD_LOSSES["forward_kl"], ids, 2.0, chunk=16)
    chunked = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = F.linear(hidden, weight, bias)
        KD_LOSSES["forward_kl"](logits, **targets, mask=mask, tau=2.0) + response_ce(logits, ids, mask)
    whole = sum(saved)
    logits_bytes = 4 * 64 * 4000 * 4
    assert whole > logits_bytes and chunked < logits_bytes / 4, (whole, chunked)

"""The training objective: which losses a step computes and how they add up.

    total = alpha * tau^2 * KD(T->T) + beta * tau^2 * KD(S->T) + gamma * sum(CE over --ce-channels)

while fine-tuning, and the speech alignment's losses (transcription, token CTC, behaviour) before it. Every loss is
a sum over positions divided by a normaliser from `step_norms` (the global count over ranks and micro-batches),
so N ranks x A micro-batches take exactly the step one process takes on the whole batch.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from student.config import TrainConfig
from student.data import gather_positions, transcript_inputs
from student.losses import KD_LOSSES, response_losses

PARTS = ["align", "ctc", "kd_T", "kd_S", "ce_T", "ce_S"]
WEIGHTS = {"kd_T": lambda c: c.alpha * c.tau**2, "kd_S": lambda c: c.beta * c.tau**2, "ce_T": lambda c: c.gamma,
           "ce_S": lambda c: c.gamma, "align": lambda c: 1.0, "ctc": lambda c: c.ctc_weight}  # fmt: skip


def total_loss(parts: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    return sum(WEIGHTS[name](cfg) * value for name, value in parts.items())


def step_norms(micro: list[dict], ranks) -> dict:
    """What each loss sum is divided by: the global count (all ranks, all micro-batches) of response
    positions, transcript positions and clips (one transcript each), over the world size (DDP averages gradients
    over ranks), so N ranks x A micro-batches take the same step as one process on the whole batch."""
    counts = torch.zeros(3, dtype=torch.float64)
    for b in micro:
        counts[0] += b["mask"].sum()
        counts[1] += b["transcript_mask"].sum()
        counts[2] += b["transcript_mask"].shape[0]
    counts = ranks.all_sum(counts)
    return {"response": counts[0].item() / ranks.world, "transcript": counts[1].item() / ranks.world,
            "clips": counts[2].item() / ranks.world}  # fmt: skip


def kd_targets(batch: dict) -> dict:
    """The batch's KD targets as the KD losses take them: top-k (ids, logprobs, tail) or sampled (ids, counts)."""
    if "draw_ids" in batch:
        return {"sample_ids": batch["draw_ids"], "sample_counts": batch["draw_counts"]}
    return {"teacher_ids": batch["topk_ids"], "teacher_logprobs": batch["topk_logprobs"],
            "tail_logmass": batch["tail_logmass"]}  # fmt: skip


def channel_losses(model, batch, cfg: TrainConfig, norms: dict, encoded=None) -> dict[str, torch.Tensor]:
    """KD and CE terms of each channel the config uses, from the student's hidden states at the response positions
    and its LM head, in chunks of --loss-chunk positions (student.losses.response_losses). `norms`: what to divide
    each sum by (step_norms); `encoded`: the encoder's output for the batch's speech, when the caller has it."""
    kd = KD_LOSSES[cfg.kd]
    ce_channels = cfg.ce_set()
    weight, bias = model.head()
    out = {}
    for channel, kd_weight in (("T", cfg.alpha), ("S", cfg.beta)):
        with_kd, with_ce = kd_weight > 0, channel in ce_channels
        if not (with_kd or with_ce):
            continue
        hidden = model.response_hidden(batch, channel, encoded=encoded if channel == "S" else None)
        terms = response_losses(hidden, weight, bias, batch["mask"], kd_targets(batch) if with_kd else None,
                                kd if with_kd else None, batch["response_ids"] if with_ce else None, cfg.tau,
                                norms["response"], cfg.loss_chunk)  # fmt: skip
        if with_kd:
            out[f"kd_{channel}"] = terms["kd"]
        if with_ce:
            out[f"ce_{channel}"] = terms["ce"]
    return out


def alignment_loss(model, batch, cfg: TrainConfig, norms: dict) -> dict[str, torch.Tensor]:
    """Speech alignment (the composed student): from each clip's speech alone, predict its turn's own tokens, through
    the backbone (`align`) and, with --ctc-weight > 0, straight from the encoder frames by CTC (`ctc`)."""
    encoded = model.encoder(batch["speech"], batch["speech_lengths"])
    embeds, attention, pos = transcript_inputs(model, batch, encoded)
    hidden = gather_positions(model.hidden_from_embeds(embeds, attention), pos)
    weight, bias = model.head()
    parts = {"align": response_losses(hidden, weight, bias, batch["transcript_mask"], None, None,
                                      batch["transcript_ids"], normalizer=norms["transcript"],
                                      chunk=cfg.loss_chunk)["ce"]}  # fmt: skip
    if cfg.ctc_weight > 0:
        # the transcript without its end-of-turn token
        parts["ctc"] = model.ctc_loss(encoded, batch["transcript_ids"], batch["transcript_mask"].sum(1) - 1,
                                      norms["clips"])  # fmt: skip
    return parts


class Objective(torch.nn.Module):
    """The student and its losses as one module: what DistributedDataParallel wraps, since DDP synchronises
    the gradients of what its forward ran."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict, aligning: bool, norms: dict) -> dict[str, torch.Tensor]:
        if not aligning:
            if self.model.kind != "composed" or not (self.cfg.adapter == "ctc-embed" and self.cfg.ctc_weight > 0):
                return channel_losses(self.model, batch, self.cfg, norms)
            # the ctc-embed interface reads greedy CTC emissions, which no KD/CE gradient sees: token CTC stays
            # on so fine-tuning cannot pull the head off what it emits (without it fine-tuning undid the alignment:
            # docs/design.md, "How the toy student hears")
            encoded = self.model.encoder(batch["speech"], batch["speech_lengths"])
            parts = channel_losses(self.model, batch, self.cfg, norms, encoded)
            parts["ctc"] = self.token_ctc(batch, norms, encoded)
            return parts
        parts = {}
        if self.cfg.align in ("transcribe", "both"):
            parts.update(alignment_loss(self.model, batch, self.cfg, norms))
        elif self.cfg.ctc_weight > 0:  # token CTC of the encoder frames stays on in every alignment mode
            parts["ctc"] = self.token_ctc(batch, norms)
        if self.cfg.align in ("behave", "both"):
            # behaviour alignment: from the spoken prompt, the frozen backbone should give the teacher's cached
            # distribution over the response (KD) and the response itself (CE), through the S channel only
            parts.update(channel_losses(self.model, batch, self.behave_cfg, norms))
        return parts

    def token_ctc(self, batch: dict, norms: dict, encoded=None) -> torch.Tensor:
        """CTC of each clip's encoder frames against its turn's tokens (without the end-of-turn token)."""
        if encoded is None:
            encoded = self.model.encoder(batch["speech"], batch["speech_lengths"])
        return self.model.ctc_loss(encoded, batch["transcript_ids"], batch["transcript_mask"].sum(1) - 1,
                                   norms["clips"])  # fmt: skip

    @property
    def behave_cfg(self) -> TrainConfig:
        return replace(self.cfg, alpha=0.0, beta=self.cfg.beta or 0.5, ce_channels="S")

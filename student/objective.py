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
from student.data import SpeechTemplate, gather_positions, speech_inputs
from student.losses import KD_LOSSES, response_ce

PARTS = ["align", "ctc", "kd_T", "kd_S", "ce_T", "ce_S"]
WEIGHTS = {"kd_T": lambda c: c.alpha * c.tau**2, "kd_S": lambda c: c.beta * c.tau**2, "ce_T": lambda c: c.gamma,
           "ce_S": lambda c: c.gamma, "align": lambda c: 1.0, "ctc": lambda c: c.ctc_weight}  # fmt: skip


def total_loss(parts: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    return sum(WEIGHTS[name](cfg) * value for name, value in parts.items())


def step_norms(micro: list[dict], ranks) -> dict:
    """What each loss sum is divided by: the global count (all ranks, all micro-batches) of response
    positions, transcript positions and examples, over the world size (DDP averages gradients over ranks),
    so N ranks x A micro-batches take the same step as one process on the whole batch."""
    counts = torch.zeros(3, dtype=torch.float64)
    for b in micro:
        counts[0] += b["mask"].sum()
        counts[1] += b["transcript_mask"].sum()
        counts[2] += b["mask"].shape[0]
    counts = ranks.all_sum(counts)
    return {"response": counts[0].item() / ranks.world, "transcript": counts[1].item() / ranks.world,
            "examples": counts[2].item() / ranks.world}  # fmt: skip


def channel_losses(model, template, batch, cfg: TrainConfig, norms: dict, encoded=None) -> dict[str, torch.Tensor]:
    """KD and CE terms of each channel the config uses. `norms`: what to divide each sum by (step_norms);
    `encoded`: the encoder's output for the batch's speech, when the caller has it."""
    kd = KD_LOSSES[cfg.kd]
    ce_channels = cfg.ce_set()
    out = {}
    if "draw_ids" in batch:  # sampled targets
        targets = dict(sample_ids=batch["draw_ids"], sample_counts=batch["draw_counts"], mask=batch["mask"],
                       tau=cfg.tau, normalizer=norms["response"])  # fmt: skip
    else:
        targets = dict(teacher_ids=batch["topk_ids"], teacher_logprobs=batch["topk_logprobs"], mask=batch["mask"],
                       tau=cfg.tau, tail_logmass=batch["tail_logmass"], normalizer=norms["response"])  # fmt: skip
    if cfg.alpha > 0 or "T" in ce_channels:
        logits = model.forward_embeds(model.embed(batch["text_ids"]), batch["text_attention"])
        logits = gather_positions(logits, batch["text_response_pos"])
        if cfg.alpha > 0:
            out["kd_T"] = kd(logits, **targets)
        if "T" in ce_channels:
            out["ce_T"] = response_ce(logits, batch["response_ids"], batch["mask"], norms["response"])
    if cfg.beta > 0 or "S" in ce_channels:
        embeds, attention, pos = speech_inputs(model, template, batch, encoded=encoded)
        logits = gather_positions(model.forward_embeds(embeds, attention), pos)
        if cfg.beta > 0:
            out["kd_S"] = kd(logits, **targets)
        if "S" in ce_channels:
            out["ce_S"] = response_ce(logits, batch["response_ids"], batch["mask"], norms["response"])
    return out


def alignment_loss(model, batch, cfg: TrainConfig, norms: dict) -> dict[str, torch.Tensor]:
    """Speech alignment: from the speech alone, predict the prompt's own tokens, through the backbone
    (`align`) and, with --ctc-weight > 0, straight from the encoder frames by CTC (`ctc`)."""
    encoded = model.encoder(batch["speech"], batch["speech_lengths"])
    embeds, attention, pos = speech_inputs(model, SpeechTemplate([], []), batch, target="transcript", encoded=encoded)
    logits = gather_positions(model.forward_embeds(embeds, attention), pos)
    parts = {"align": response_ce(logits, batch["transcript_ids"], batch["transcript_mask"], norms["transcript"])}
    if cfg.ctc_weight > 0:
        # the transcript without its end-of-turn token
        parts["ctc"] = model.ctc_loss(encoded, batch["transcript_ids"], batch["transcript_mask"].sum(1) - 1,
                                      norms["examples"])  # fmt: skip
    return parts


class Objective(torch.nn.Module):
    """The student and its losses as one module: what DistributedDataParallel wraps, since DDP synchronises
    the gradients of what its forward ran."""

    def __init__(self, model, template: SpeechTemplate, cfg: TrainConfig):
        super().__init__()
        self.model, self.template, self.cfg = model, template, cfg

    def forward(self, batch: dict, aligning: bool, norms: dict) -> dict[str, torch.Tensor]:
        if not aligning:
            if not (self.cfg.adapter == "ctc-embed" and self.cfg.ctc_weight > 0):
                return channel_losses(self.model, self.template, batch, self.cfg, norms)
            # the ctc-embed interface reads greedy CTC emissions, which no KD/CE gradient sees: token CTC stays
            # on so fine-tuning cannot pull the head off what it emits (without it fine-tuning undid the alignment:
            # docs/design.md, "How the toy student hears")
            encoded = self.model.encoder(batch["speech"], batch["speech_lengths"])
            parts = channel_losses(self.model, self.template, batch, self.cfg, norms, encoded)
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
            parts.update(channel_losses(self.model, self.template, batch, self.behave_cfg, norms))
        return parts

    def token_ctc(self, batch: dict, norms: dict, encoded=None) -> torch.Tensor:
        """CTC of the encoder frames against the prompt's tokens (without its end-of-turn token)."""
        if encoded is None:
            encoded = self.model.encoder(batch["speech"], batch["speech_lengths"])
        return self.model.ctc_loss(encoded, batch["transcript_ids"], batch["transcript_mask"].sum(1) - 1,
                                   norms["examples"])  # fmt: skip

    @property
    def behave_cfg(self) -> TrainConfig:
        return replace(self.cfg, alpha=0.0, beta=self.cfg.beta or 0.5, ce_channels="S")

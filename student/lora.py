"""LoRA adapters through peft, on the LM of either kind of student (and optionally a speech LLM's audio tower).

    python student/train.py --logits data/cache --student Qwen/Qwen2-Audio-7B-Instruct --lora-rank 16
    python student/train.py ... --lora-rank 16 --lora-targets q_proj,v_proj --lora-audio --merge

Only the adapters train (and whatever is trained whole beside them: PEFT's modules_to_save); the adapter is saved in
PEFT's format, and `--merge` also writes the adapter merged into a plain model. The adapters are placed by module
name *inside the LM* (its qualified name in the model, from `get_decoder()`), so an audio tower whose attention uses
the same projection names (Qwen2-Audio's q_proj/k_proj/v_proj) gets none unless `--lora-audio`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch.nn as nn

from student.config import DEFAULT_LORA_TARGETS as DEFAULT_TARGETS  # the LM's attention and MLP projections

# a Whisper-style audio tower's attention and MLP projections
AUDIO_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class LoraSettings:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    audio: bool = False  # adapters on the audio tower too

    def to_dict(self) -> dict:
        return asdict(self)


def _prefix_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("the module is not part of the model")


def target_pattern(model: nn.Module, settings: LoraSettings, lm: nn.Module, audio: nn.Module | None = None) -> str:
    """A regex over module names (peft fullmatches it) selecting the target projections inside the LM (and the
    audio tower with settings.audio)."""
    parts = [(_prefix_of(model, lm), settings.targets)]
    if settings.audio and audio is not None:
        parts.append((_prefix_of(model, audio), AUDIO_TARGETS))
    alternatives = []
    for prefix, names in parts:
        head = re.escape(prefix) + r"\." if prefix else ""
        alternatives.append(rf"{head}(?:.*\.)?(?:{'|'.join(map(re.escape, names))})")
    return "|".join(f"(?:{a})" for a in alternatives)


def apply_lora(model: nn.Module, settings: LoraSettings, lm: nn.Module | None = None, audio: nn.Module | None = None,
               trained_modules: list[str] | None = None):  # fmt: skip
    """`model` wrapped with LoRA adapters (a peft PeftModel). `lm`: the LM inside it (default: get_decoder());
    `audio`: its audio tower (for settings.audio); `trained_modules`: module names trained whole beside the adapters."""
    from peft import LoraConfig, get_peft_model

    lm = lm if lm is not None else model.get_decoder()
    if settings.audio and audio is None:
        raise ValueError("LoRA on the audio tower (settings.audio) needs the audio tower module")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=target_pattern(model, settings, lm, audio),
                        modules_to_save=trained_modules or None, bias="none")  # fmt: skip
    return get_peft_model(model, config)


def lora_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if "lora_" in n]

"""A pretrained speech LLM from transformers as the student: Qwen2-Audio, the Qwen2.5-Omni thinker, and (through
the same path, untested here) Voxtral and Granite Speech.

    python student/train.py --logits data/cache --student Qwen/Qwen2-Audio-7B-Instruct --lora-rank 16
    python student/train.py --logits data/cache --student Qwen/Qwen2.5-Omni-7B      # its thinker (text + audio)

The model is loaded with its own class and `AutoProcessor`; nothing of speechkd's own speech stack is used. Channel
T is the student's chat template with the typed prompt; channel S the same template with an audio part in place of
the prompt text, built by the student's processor (its feature extractor on the clip's waveform, its audio
placeholder tokens expanded to the clip's length); both then take the cached response token ids, and the KD/CE
terms are computed at the response positions only, from the last hidden states and the LM head in chunks
(student.losses.response_losses). Which model parts train: the LM (`--freeze-backbone`, or LoRA adapters with
`--lora-rank`), the projector (`--freeze-adapter`), the audio tower (`--freeze-encoder`; frozen by default, as
speech LLMs keep their Whisper-like encoder).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pipeline.chat import render_user_turn
from pipeline.errors import InputMismatch
from pipeline.files import write_json_atomic

STUDENT_FILE = "speechkd_student.json"
# model_type (config.json) -> the transformers class speechkd trains; the full Qwen2.5-Omni (thinker + talker)
# checkpoint is trained through its thinker, the part that reads audio and writes text
CLASSES = {
    "qwen2_audio": "Qwen2AudioForConditionalGeneration",
    "qwen2_5_omni": "Qwen2_5OmniThinkerForConditionalGeneration",
    "qwen2_5_omni_thinker": "Qwen2_5OmniThinkerForConditionalGeneration",
    "voxtral": "VoxtralForConditionalGeneration",
    "granite_speech": "GraniteSpeechForConditionalGeneration",
}
TESTED = ("qwen2_audio", "qwen2_5_omni_thinker")  # tiny random instances of these train in the tests
ENCODER_NAMES = ("audio_tower", "encoder")  # the audio encoder's attribute in these classes
PROJECTOR_NAMES = ("multi_modal_projector", "projector")
FROZEN_NAMES = ("visual",)  # never trained: speechkd distils text and speech only


class _Passthrough(nn.Module):
    """Stands in for the LM head during a forward: the model then returns its last hidden states as 'logits'."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def model_class(name_or_path: str):
    """The transformers class to load a speech LLM with, from its config's model_type; a one-line error for any
    other model."""
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputMismatch(f"--student {name_or_path}: not a loadable model ({first}); give a Hugging Face id or "
                            f"local directory of a speech LLM ({', '.join(sorted(CLASSES))})") from None  # fmt: skip
    kind = getattr(config, "model_type", None)
    if kind not in CLASSES:
        raise InputMismatch(f"--student {name_or_path}: model_type {kind!r} is not a speech LLM speechkd trains; it "
                            f"trains {', '.join(sorted(CLASSES))} (for a text LLM with speechkd's own speech encoder, "
                            f"use --backbone instead of --student)")  # fmt: skip
    return getattr(transformers, CLASSES[kind])


def _module_path(root: nn.Module, target: nn.Module) -> str | None:
    for name, module in root.named_modules():
        if module is target:
            return name
    return None


def _named_child(root: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The first module whose qualified name ends in one of `names` (the shallowest), with its name."""
    found = [(n, m) for n, m in root.named_modules() if n.rsplit(".", 1)[-1] in names]
    return min(found, key=lambda nm: nm[0].count(".")) if found else None


@dataclass
class HFStudentConfig:
    """What a saved `hf` student is (speechkd_student.json in its directory)."""

    base: str  # the pretrained model it started from (id or path)
    train_encoder: bool = False
    train_adapter: bool = True
    train_backbone: bool = True
    lora: dict | None = None  # the LoRA settings (student.lora.LoraSettings), None for full fine-tuning
    kind: str = "hf"
    extra: dict = field(default_factory=dict)


class HFSpeechLLM(nn.Module):
    """A transformers speech LLM with speechkd's student interface (student.interface.Student)."""

    kind = "hf"

    def __init__(self, model: nn.Module, processor, cfg: HFStudentConfig):
        super().__init__()
        self.model, self.processor, self.cfg = model, processor, cfg
        self.tokenizer = processor.tokenizer
        base = self.base_model
        encoder, projector = _named_child(base, ENCODER_NAMES), _named_child(base, PROJECTOR_NAMES)
        decoder = base.get_decoder()
        self.parts = {"encoder": encoder[0] if encoder else None, "adapter": projector[0] if projector else None,
                      "backbone": _module_path(base, decoder)}  # fmt: skip
        if encoder is None:
            raise InputMismatch(f"--student {cfg.base}: no audio encoder ({' or '.join(ENCODER_NAMES)}) in "
                                f"{type(base).__name__}")  # fmt: skip
        self._set_trainable()

    # --- what is trained ---------------------------------------------------------------------------------------

    @property
    def base_model(self) -> nn.Module:
        """The transformers model itself (under a PEFT wrapper when LoRA is on)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _part_of(self, name: str) -> str:
        for part in ("encoder", "adapter"):
            prefix = self.parts[part]
            if prefix and (name == prefix or name.startswith(prefix + ".")):
                return part
        if any(seg in FROZEN_NAMES for seg in name.split(".")):
            return "frozen"
        return "backbone"  # the LM, its embeddings and head

    def _set_trainable(self) -> None:
        """Full fine-tuning: each part as its switch says. LoRA: the adapters and the modules PEFT trains whole
        beside them (modules_to_save: the projector, the audio tower when it trains without adapters) only."""
        train = {"encoder": self.cfg.train_encoder, "adapter": self.cfg.train_adapter, "frozen": False,
                 "backbone": self.cfg.train_backbone}  # fmt: skip
        for name, p in self.base_model.named_parameters():
            if self.cfg.lora is not None:
                p.requires_grad_(("lora_" in name or "modules_to_save" in name) and self._part_of(name) != "frozen")
            else:
                p.requires_grad_(train[self._part_of(name)])

    def speech_parameters(self):
        """The audio encoder's and projector's parameters (trained at --lr)."""
        for name, p in self.base_model.named_parameters():
            if self._part_of(name) in ("encoder", "adapter"):
                yield p

    def backbone_parameters(self):
        """The LM's parameters, LoRA adapters included (trained at --backbone-lr)."""
        for name, p in self.base_model.named_parameters():
            if self._part_of(name) == "backbone":
                yield p

    # --- the forward the objective uses -----------------------------------------------------------------------

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        lm_head = self.base_model.get_output_embeddings()
        return lm_head.weight, getattr(lm_head, "bias", None)

    @contextlib.contextmanager
    def _hidden_states_out(self):
        base = self.base_model
        lm_head = base.get_output_embeddings()
        base.set_output_embeddings(_Passthrough())
        try:
            yield
        finally:
            base.set_output_embeddings(lm_head)

    def _hidden(self, **inputs) -> torch.Tensor:
        with self._hidden_states_out():
            return self.model(**inputs, use_cache=False).logits

    def text_hidden(self, batch: dict) -> torch.Tensor:
        """Channel T: last hidden states (B, L, H) of the typed prompt in the student's template + the response."""
        return self._hidden(input_ids=batch["text_ids"], attention_mask=batch["text_attention"])

    def speech_hidden(self, batch: dict, **_) -> torch.Tensor:
        """Channel S: the same with the clip in place of the prompt, through the model's own audio path."""
        return self._hidden(input_ids=batch["speech_ids"], attention_mask=batch["speech_attention"],
                            input_features=batch["input_features"].to(self._dtype()),
                            feature_attention_mask=batch["feature_attention_mask"])  # fmt: skip

    def response_hidden(self, batch: dict, channel: str, encoded=None) -> torch.Tensor:
        """Hidden states (B, n, H) at the positions that predict the cached response tokens, channel T or S."""
        from student.data import gather_positions

        if channel == "T":
            return gather_positions(self.text_hidden(batch), batch["text_response_pos"])
        return gather_positions(self.speech_hidden(batch), batch["speech_response_pos"])

    def _dtype(self) -> torch.dtype:
        return next(self.base_model.parameters()).dtype

    # --- evaluation -------------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @torch.no_grad()
    def _generate(self, inputs: dict, max_new_tokens: int) -> list[str]:
        inputs = {k: v.to(self._device()) for k, v in inputs.items()}
        if "input_features" in inputs:
            inputs["input_features"] = inputs["input_features"].to(self._dtype())
        tok = self.tokenizer
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id or tok.eos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        return tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def answer_text(self, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
        """Greedy answers to typed prompts, in the student's own template."""
        self.eval()
        out = []
        for i in range(0, len(prompts), batch_size):
            texts = [render_user_turn(self.processor, p) for p in prompts[i : i + batch_size]]
            enc = self.tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                                 return_tensors="pt")  # fmt: skip
            out.extend(self._generate(dict(enc), max_new_tokens))
        return out

    @torch.no_grad()
    def answer_speech(self, clips: list[np.ndarray], max_new_tokens: int) -> list[str]:
        """Greedy answers to spoken prompts (waveforms at 16 kHz), through the student's processor."""
        self.eval()
        text = render_user_turn(self.processor, None)
        enc = self.processor(text=[text] * len(clips), audio=list(clips), sampling_rate=16_000, padding=True,
                             padding_side="left", return_tensors="pt")  # fmt: skip
        return self._generate(dict(enc), max_new_tokens)

    # --- save / load ------------------------------------------------------------------------------------------

    def save(self, out_dir: Path, tokenizer=None, merge: bool = False) -> None:
        """The student in its own directory: the LoRA adapter (PEFT format) and the processor, or the whole model
        (full fine-tuning); with `merge` (LoRA) also `merged/`, the adapter merged into a plain model."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
        write_json_atomic(out_dir / STUDENT_FILE, asdict(self.cfg))
        if merge and self.cfg.lora is not None:
            merged = _merged_copy(self.model)
            merged.save_pretrained(out_dir / "merged")
            self.processor.save_pretrained(out_dir / "merged")

    @classmethod
    def load(cls, out_dir: Path) -> "HFSpeechLLM":
        from transformers import AutoProcessor

        out_dir = Path(out_dir)
        cfg = HFStudentConfig(**json.loads((out_dir / STUDENT_FILE).read_text()))
        processor = AutoProcessor.from_pretrained(out_dir)
        if cfg.lora is not None:
            from peft import PeftModel

            base = model_class(cfg.base).from_pretrained(cfg.base, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, out_dir)
        else:
            model = model_class(str(out_dir)).from_pretrained(out_dir, dtype=torch.float32)
        return cls(model, processor, cfg)


def _merged_copy(peft_model) -> nn.Module:
    """The LoRA adapter merged into a copy of the base model (the training model keeps its adapters)."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()


def load_pretrained(name_or_path: str, cfg: HFStudentConfig, lora=None, dtype=torch.float32) -> HFSpeechLLM:
    """A pretrained speech LLM to train: its class, its processor, LoRA adapters when `lora` (student.lora)."""
    from transformers import AutoProcessor

    model = model_class(name_or_path).from_pretrained(name_or_path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(name_or_path)
    if lora is not None:
        from student.lora import apply_lora

        encoder = _named_child(model, ENCODER_NAMES)
        model = apply_lora(model, lora, audio=encoder[1] if encoder else None,
                           trained_modules=_trained_modules(model, cfg))  # fmt: skip
    return HFSpeechLLM(model, processor, cfg)


def _trained_modules(model: nn.Module, cfg: HFStudentConfig) -> list[str]:
    """The modules trained whole beside the LoRA adapters (PEFT's modules_to_save): the projector, and the audio
    tower when it trains without adapters of its own."""
    out = []
    projector = _named_child(model, PROJECTOR_NAMES)
    if cfg.train_adapter and projector:
        out.append(projector[0])
    encoder = _named_child(model, ENCODER_NAMES)
    if cfg.train_encoder and encoder and not (cfg.lora or {}).get("audio"):
        out.append(encoder[0])
    return out

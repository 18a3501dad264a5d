"""The student interface the objective, the loop and the evaluation talk to, and its two implementations.

    composed   speechkd's own speech encoder + adapter + a text LLM (student/model.py: SpeechLLM)
    hf         a pretrained speech LLM from transformers, with its own processor (student/hf.py: HFSpeechLLM)

Both give: `head()` (the LM head's weight and bias), `response_hidden(batch, channel)` (the last hidden states at the
positions that predict the cached response tokens, channel "T" typed or "S" spoken: the losses apply the head
there, in chunks), `speech_parameters()` / `backbone_parameters()` (the optimizer's two groups), `answer_text` /
`answer_speech` (greedy answers for the evaluation), `save` / `load` (a self-contained `final/`), `tokenizer`, and
`kind`. `build_student` makes the one a config asks for; `load_student` reads either back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Protocol

import torch

from pipeline.errors import MissingInput
from student.config import ConfigError, TrainConfig


class Student(Protocol):
    kind: str
    tokenizer: object

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def response_hidden(self, batch: dict, channel: str, encoded=None) -> torch.Tensor: ...

    def speech_parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def backbone_parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def answer_text(self, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]: ...

    def answer_speech(self, clips: list, max_new_tokens: int) -> list[str]: ...

    def save(self, out_dir: Path, tokenizer=None, merge: bool = False) -> None: ...


def lora_settings(cfg: TrainConfig):
    if not cfg.lora_rank:
        return None
    from student.lora import LoraSettings

    return LoraSettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_targets), cfg.lora_audio)


def build_student(cfg: TrainConfig, data, backbone: str | None, device) -> Student:
    """The student this run trains, on `device`: a pretrained speech LLM (--student) or the composed one."""
    torch.manual_seed(cfg.seed)
    lora = lora_settings(cfg)
    if cfg.kind == "hf":
        from student.hf import HFStudentConfig, load_pretrained

        hcfg = HFStudentConfig(base=cfg.student, train_encoder=not (cfg.freeze_encoder or cfg.freeze_encoder is None),
                               train_adapter=not cfg.freeze_adapter, train_backbone=not cfg.freeze_backbone,
                               lora=lora.to_dict() if lora else None)  # fmt: skip
        return load_pretrained(cfg.student, hcfg, lora).to(device)
    from pipeline.features import feature_config_of
    from student.model import SpeechLLM, StudentConfig, pretrained_toy_encoder

    kind = feature_config_of(data.features_dir).kind
    if cfg.encoder != "conv-transformer" and pretrained_toy_encoder(cfg.encoder) is None and kind != "whisper":
        raise ConfigError(
            f"--encoder {cfg.encoder} takes Whisper log-mel features but {data.features_dir} holds {kind!r} "
            f"features: run `python -m pipeline.features --kind whisper --out data/features_whisper` and pass "
            f"--features data/features_whisper"
        )
    freeze_encoder = cfg.freeze_encoder
    if freeze_encoder is None:  # a pretrained toy encoder is kept as built, as speech LLMs keep Whisper
        freeze_encoder = pretrained_toy_encoder(cfg.encoder) is not None
    scfg = StudentConfig(backbone=backbone, encoder=cfg.encoder, n_mels=data.features.cfg.n_mels,
                         dropout=cfg.encoder_dropout, train_encoder=not freeze_encoder,
                         train_adapter=not cfg.freeze_adapter, train_backbone=not cfg.freeze_backbone,
                         ctc=cfg.ctc_weight > 0 or cfg.adapter == "ctc-embed", adapter=cfg.adapter,
                         lora=lora.to_dict() if lora else None)  # fmt: skip
    return SpeechLLM(scfg, tokenizer=data.tokenizer).to(device)


def save_student(model: Student, out_dir: Path | str, tokenizer=None, merge: bool = False) -> Path:
    """A run's final/ as a unit: written into final.tmp/, every file listed with its sha256 (MANIFEST.json, written
    last), then put in place of the old one; a run stopped mid-save (a full disk) leaves no half directory."""
    import os
    import shutil

    from pipeline.files import write_directory_manifest, write_error

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save(tmp, tokenizer, merge=merge)
        write_directory_manifest(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except Exception as exc:
        problem = write_error(tmp, exc)
        shutil.rmtree(tmp, ignore_errors=True)
        if problem is None:
            raise
        raise problem from None
    return out_dir


def load_student(path: Path | str, verify: bool = True) -> Student:
    """A saved student (a run's final/) of either kind, from its directory alone; every file is checked against its
    MANIFEST.json first (`verify`), a directory saved before manifests existed is read with a note."""
    from pipeline.files import MANIFEST, verify_directory
    from student.hf import STUDENT_FILE, HFSpeechLLM
    from student.model import SpeechLLM

    path = Path(path)
    if verify and (path / MANIFEST).exists():
        verify_directory(path, "the saved student", "train it again, or restore the directory from a copy")
    elif verify and is_student_dir(path):
        print(f"note: {path} has no {MANIFEST} (saved by an older speechkd): its files are not verified")
    if (path / STUDENT_FILE).exists() and json.loads((path / STUDENT_FILE).read_text()).get("kind") == "hf":
        return HFSpeechLLM.load(path)
    if (path / "student_config.json").exists():
        return SpeechLLM.load(path)
    raise MissingInput(f"no student at {path} (no student_config.json or {STUDENT_FILE}): train one with "
                       f"`python student/train.py` or pass --student <run>/final")  # fmt: skip


def is_student_dir(path: Path | str) -> bool:
    from student.hf import STUDENT_FILE

    return (Path(path) / "student_config.json").exists() or (Path(path) / STUDENT_FILE).exists()

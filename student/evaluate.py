"""Greedy answers to the eval split, typed and spoken; the paper's two gaps.

    python student/evaluate.py --student data/runs/student --logits data/cache

Reports exact-match accuracy of: the teacher on text (evaluated here, in its
own run), the student on text, the student on speech; forgetting = teacher text
- student text, modality gap = student text - student speech.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.chat import exact_match, render_prompt
from pipeline.config import parse_config
from pipeline.errors import MissingInput, UserError, cli
from student.config import EvalConfig
from student.inputs import HELDOUT_SETS, HeldoutSet, RunInputs, Samples, SpeechIndex


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


def spoken_answers(model, evalset: "EvalSet", max_new_tokens: int, batch_size: int) -> list[str]:
    """The student's greedy answers to every spoken question of the eval set, read and answered a batch at a time
    (its speech: stored features or waveforms, whatever its kind reads)."""
    out = []
    for i in range(0, len(evalset), batch_size):
        out.extend(model.answer_speech(evalset.speech_of(i, i + batch_size), max_new_tokens))
    return out


@dataclass
class EvalSet:
    """Eval questions with one speech rendition each; the speech is read when asked for, a batch at a time."""

    rows: list[dict]  # sample_id, prompt, response
    clips: list[int]  # positions in the speech store
    speech: SpeechIndex

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sample_ids(self) -> list[str]:
        return [r["sample_id"] for r in self.rows]

    def speech_of(self, start: int, stop: int) -> list[np.ndarray]:
        return [self.speech.store.read(i) for i in self.clips[start:stop]]


REFERENCES = ("dataset", "teacher")


def teacher_references(reader: CacheReader) -> dict[str, str]:
    """The responses the cache holds (the teacher's own, in a cache made with --responses teacher), by sample."""
    return {r["sample_id"]: r["response"] for r in reader.iter_rows(["sample_id", "response"])}


def references_for(reader: CacheReader, reference: str) -> dict[str, str] | None:
    """What the eval's exact match compares to: None = the samples' (dataset) answers; "teacher" = the
    cache's responses, which must be teacher-written."""
    if reference == "dataset":
        return None
    if reader.fingerprint.get("responses") in (None, "dataset"):
        raise UserError(f"--reference teacher: the cache at {reader.dir} scored the dataset's responses (made without "
                        f"--responses teacher); use --reference dataset")  # fmt: skip
    return teacher_references(reader)


def eval_set(samples: Samples, speech: SpeechIndex, split: str = "eval", limit: int | None = None,
             references: dict[str, str] | None = None) -> EvalSet:  # fmt: skip
    """The split's questions that have a reference answer and speech (SpeechIndex.first: one clip each); reads no
    features. `references`: answers by sample id to score against instead of the samples' own (the teacher's,
    from the cache); samples without one are left out."""
    rows = [samples.row(sid) for sid in samples.split(split)]
    if references is not None:
        rows = [{**r, "response": references[r["sample_id"]]} for r in rows if r["sample_id"] in references]
    rows = [r for r in rows if r["sample_id"] in speech and r["response"]]
    rows = rows[:limit] if limit else rows
    return EvalSet(rows, [speech.first(r["sample_id"]) for r in rows], speech)


@torch.no_grad()
def evaluate_student(
    model, evalset: EvalSet, max_new_tokens: int = 32, subsets: dict[str, set[str]] | None = None,
    device=None, batch_size: int = 64,
) -> dict:  # fmt: skip
    """Student text/speech exact match and modality gap; with `subsets` ({name: sample ids}) also per subset.
    Runs on the model's device; `device` only checks that is where the caller expects it."""
    model.eval()
    if device is not None and _device_of(model) != torch.device(device):
        raise ValueError(f"the student is on {_device_of(model)}, evaluation asked for {device}")
    rows = evalset.rows
    text = model.answer_text([r["prompt"] for r in rows], max_new_tokens, batch_size)
    speech = spoken_answers(model, evalset, max_new_tokens, batch_size)
    report = {}
    for name, ids in {"": None, **(subsets or {})}.items():
        pick = [i for i, r in enumerate(rows) if ids is None or r["sample_id"] in ids]
        refs = [rows[i]["response"] for i in pick]
        t = exact_match([text[i] for i in pick], refs)
        s = exact_match([speech[i] for i in pick], refs)
        prefix = f"{name}_" if name else ""
        report.update({f"{prefix}student_text_accuracy": t, f"{prefix}student_speech_accuracy": s,
                       f"{prefix}modality_gap": t - s, f"{prefix}n_eval": len(pick)})  # fmt: skip
    return report


@torch.no_grad()
def evaluate_heldout_voice(model, evalset: EvalSet, subsets: dict[str, set[str]] | None = None,
                           max_new_tokens: int = 32, batch_size: int = 64,
                           key: str = "heldout_voice") -> dict:  # fmt: skip
    """Spoken exact match on the eval split in a voice (or synthesizer) never heard in training (overall and per
    subset), under report keys `key`_..."""
    model.eval()
    rows = evalset.rows
    speech = spoken_answers(model, evalset, max_new_tokens, batch_size)
    report = {key: ",".join(sorted(evalset.speech.voices))}
    for name, ids in {"": None, **(subsets or {})}.items():
        pick = [i for i, r in enumerate(rows) if ids is None or r["sample_id"] in ids]
        prefix = f"{key}_{name}_" if name else f"{key}_"
        report[f"{prefix}student_speech_accuracy"] = exact_match([speech[i] for i in pick],
                                                                 [rows[i]["response"] for i in pick])  # fmt: skip
        report[f"{prefix}n_eval"] = len(pick)
    return report


@torch.no_grad()
def evaluate_teacher(teacher: str, evalset: EvalSet, max_new_tokens: int = 32, device="cpu") -> float:
    """The text teacher's own accuracy (transformers, loaded for evaluation only, on `device`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student.model import generate_from_embeds

    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).to(device).eval()
    rows, embed, answers = evalset.rows, model.get_input_embeddings(), []
    for i in range(0, len(rows), 64):
        embeds = [embed(torch.tensor(tok(render_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"],
                                     device=device)) for r in rows[i : i + 64]]  # fmt: skip
        answers.extend(generate_from_embeds(model, tok, embeds, max_new_tokens))
    del model
    return exact_match(answers, [r["response"] for r in rows])


def evaluate_run(model, inputs: RunInputs, reference: str = "dataset",
                 heldout: list[HeldoutSet] | None = None, finetuned: set[str] | None = None, limit: int | None = None,
                 device=None, autocast=contextlib.nullcontext) -> dict:  # fmt: skip
    """The one final evaluation (student/train.py's and this command's): exact match of the teacher on text, the
    student on text and on speech over the eval split, forgetting and modality gap; per fine-tuned / other facts
    when `finetuned` names the fine-tuned samples; and spoken accuracy in each held-out set. `autocast`: the
    precision context the student runs in."""
    refs = references_for(inputs.reader, reference)
    rows = eval_set(inputs.samples, inputs.speech, limit=limit, references=refs)
    if not len(rows):
        raise MissingInput(f"no eval samples with speech features under {inputs.samples_dir} / {inputs.features_dir}")
    subsets = None
    if finetuned is not None:
        tuned = {sid for sid in rows.sample_ids if sid in finetuned}
        subsets = {"finetuned": tuned, "not_finetuned": set(rows.sample_ids) - tuned}
    report = {"reference": reference}
    with autocast():
        report.update(evaluate_student(model, rows, subsets=subsets, device=device))
        report["teacher_text_accuracy"] = evaluate_teacher(inputs.reader.teacher, rows, device=device or "cpu")
    report["forgetting"] = report["teacher_text_accuracy"] - report["student_text_accuracy"]
    for held in heldout or ():
        with autocast():
            report.update(evaluate_heldout_voice(model, eval_set(inputs.samples, held.speech, limit=limit,
                                                                            references=refs),
                                                 subsets=subsets, key=held.key))  # fmt: skip
    return report


def format_report(r: dict) -> str:
    against = {"dataset": "the dataset's answers", "teacher": "the teacher's cached answers"}.get(r.get("reference"))
    lines = [f"eval ({r['n_eval']} questions{f', exact match against {against}' if against else ''}): teacher text {r['teacher_text_accuracy']:.1%} | student text "
             f"{r['student_text_accuracy']:.1%} | student speech {r['student_speech_accuracy']:.1%} | forgetting "
             f"{r['forgetting']:+.1%} | modality gap {r['modality_gap']:+.1%}"]  # fmt: skip
    for name in ("finetuned", "not_finetuned"):
        if f"{name}_n_eval" in r:
            line = (f"  {name.replace('_', ' ')} facts ({r[f'{name}_n_eval']}): student text "
                    f"{r[f'{name}_student_text_accuracy']:.1%} | student speech "
                    f"{r[f'{name}_student_speech_accuracy']:.1%}")  # fmt: skip
            for key, _, _, what in HELDOUT_SETS:
                if f"{key}_{name}_student_speech_accuracy" in r:
                    line += f" | held-out {what} {r[f'{key}_{name}_student_speech_accuracy']:.1%}"
            lines.append(line)
    for key, _, _, what in HELDOUT_SETS:
        if f"{key}_student_speech_accuracy" in r:
            voices = r[key] if what == "voice" else f"(voices {r[key]})"
            lines.append(f"  held-out {what} {voices} ({r[f'{key}_n_eval']} questions, a {what} never used in "
                         f"training): student speech {r[f'{key}_student_speech_accuracy']:.1%}")  # fmt: skip
    return "\n".join(lines)


@cli("evaluate.py")
def main(argv: list[str] | None = None) -> None:
    from student.interface import load_student

    cfg = parse_config(EvalConfig, argv, description=__doc__).validate()
    device = cfg.resolved_device()
    model = load_student(cfg.student).to(device)
    inputs = RunInputs.open(cfg.logits, cfg.samples, cfg.features, verify=cfg.verify,
                            speech="audio" if model.kind == "hf" else "features", audio_dir=cfg.audio)  # fmt: skip
    options = {"heldout_features": cfg.heldout_features, "heldout_tts_features": cfg.heldout_tts_features}
    heldout = inputs.heldout_sets(options)
    bf16 = cfg.resolved_precision() == "bf16"
    report = evaluate_run(model, inputs, cfg.reference, heldout, limit=cfg.limit, device=device,
                          autocast=lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                                                          enabled=bf16))  # fmt: skip
    print(format_report(report))
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())

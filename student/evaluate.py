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
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.chat import exact_match, render_prompt
from pipeline.config import parse_config
from pipeline.errors import MissingInput, UserError, cli
from student.config import EvalConfig
from student.data import SpeechTemplate, pad_speech
from student.inputs import HELDOUT_SETS, HeldoutSet, RunInputs, Samples, SpeechIndex


@torch.no_grad()
def generate_from_embeds(backbone, tokenizer, rows: list[torch.Tensor], max_new_tokens: int) -> list[str]:
    """Greedy continuation of left-padded input embeddings (on the rows' device)."""
    L = max(r.shape[0] for r in rows)
    H = rows[0].shape[-1]
    device = rows[0].device
    embeds = torch.zeros(len(rows), L, H, dtype=rows[0].dtype, device=device)
    mask = torch.zeros(len(rows), L, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        embeds[b, L - r.shape[0] :] = r
        mask[b, L - r.shape[0] :] = 1
    out = backbone.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def answer_text(backbone, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    embed = backbone.get_input_embeddings()
    device = _device_of(backbone)
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = [embed(torch.tensor(tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"],
                                   device=device))
                for p in prompts[i : i + batch_size]]  # fmt: skip
        out.extend(generate_from_embeds(backbone, tokenizer, rows, max_new_tokens))
    return out


@torch.no_grad()
def answer_speech(model, tokenizer, clips: list[np.ndarray], max_new_tokens: int) -> list[str]:
    """Greedy answers to spoken prompts (one batch of clips)."""
    template = SpeechTemplate.from_tokenizer(tokenizer)
    device = _device_of(model)
    embed = model.embed
    prefix = embed(torch.tensor(template.prefix_ids, dtype=torch.long, device=device))
    suffix = embed(torch.tensor(template.suffix_ids, dtype=torch.long, device=device))
    padded = pad_speech(clips)
    sp, lens = model.speech_embeddings(padded["speech"].to(device), padded["speech_lengths"].to(device))
    rows = [torch.cat([prefix, sp[b, : lens[b]], suffix]) for b in range(len(clips))]
    return generate_from_embeds(model.backbone, tokenizer, rows, max_new_tokens)


def spoken_answers(model, tokenizer, evalset: "EvalSet", max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to every spoken question of the eval set, read and answered a batch at a time."""
    out = []
    for i in range(0, len(evalset), batch_size):
        out.extend(answer_speech(model, tokenizer, evalset.speech_of(i, i + batch_size), max_new_tokens))
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
    if reader.fingerprint.get("responses") != "teacher":
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
    model, tokenizer, evalset: EvalSet, max_new_tokens: int = 32, subsets: dict[str, set[str]] | None = None,
    device=None, batch_size: int = 64,
) -> dict:  # fmt: skip
    """Student text/speech exact match and modality gap; with `subsets` ({name: sample ids}) also per subset.
    Runs on the model's device; `device` only checks that is where the caller expects it."""
    model.eval()
    if device is not None and _device_of(model) != torch.device(device):
        raise ValueError(f"the student is on {_device_of(model)}, evaluation asked for {device}")
    rows = evalset.rows
    text = answer_text(model.backbone, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    speech = spoken_answers(model, tokenizer, evalset, max_new_tokens, batch_size)
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
def evaluate_heldout_voice(model, tokenizer, evalset: EvalSet, subsets: dict[str, set[str]] | None = None,
                           max_new_tokens: int = 32, batch_size: int = 64,
                           key: str = "heldout_voice") -> dict:  # fmt: skip
    """Spoken exact match on the eval split in a voice (or synthesizer) never heard in training (overall and per
    subset), under report keys `key`_..."""
    model.eval()
    rows = evalset.rows
    speech = spoken_answers(model, tokenizer, evalset, max_new_tokens, batch_size)
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

    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).to(device).eval()
    rows = evalset.rows
    answers = answer_text(model, tok, [r["prompt"] for r in rows], max_new_tokens)
    del model
    return exact_match(answers, [r["response"] for r in rows])


def evaluate_run(model, tokenizer, inputs: RunInputs, reference: str = "dataset",
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
        report.update(evaluate_student(model, tokenizer, rows, subsets=subsets, device=device))
        report["teacher_text_accuracy"] = evaluate_teacher(inputs.reader.teacher, rows, device=device or "cpu")
    report["forgetting"] = report["teacher_text_accuracy"] - report["student_text_accuracy"]
    for held in heldout or ():
        with autocast():
            report.update(evaluate_heldout_voice(model, tokenizer, eval_set(inputs.samples, held.speech, limit=limit,
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
    from transformers import AutoTokenizer

    from student.model import SpeechLLM

    cfg = parse_config(EvalConfig, argv, description=__doc__).validate()
    student = Path(cfg.student)
    device = cfg.resolved_device()
    inputs = RunInputs.open(cfg.logits, cfg.samples, cfg.features, verify=cfg.verify)
    options = {"heldout_features": cfg.heldout_features, "heldout_tts_features": cfg.heldout_tts_features}
    heldout = inputs.heldout_sets(options)
    model = SpeechLLM.load(student).to(device)
    tokenizer = AutoTokenizer.from_pretrained(student / "backbone")
    bf16 = cfg.resolved_precision() == "bf16"
    report = evaluate_run(model, tokenizer, inputs, cfg.reference, heldout, limit=cfg.limit, device=device,
                          autocast=lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                                                          enabled=bf16))  # fmt: skip
    print(format_report(report))
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())

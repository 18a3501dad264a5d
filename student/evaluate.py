"""Greedy answers to the eval split, typed and spoken; the paper's two gaps.

    python student/evaluate.py --student data/runs/student --logits data/cache

Reports exact-match accuracy of: the teacher on text (evaluated here, in its
own run), the student on text, the student on speech; forgetting = teacher text
- student text, modality gap = student text - student speech.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pipeline.cache import CacheReader
from pipeline.chat import exact_match, render_prompt
from pipeline.features import load_features
from pipeline.samples import load_samples
from student.data import SpeechTemplate, inputs_from_manifest


@torch.no_grad()
def generate_from_embeds(backbone, tokenizer, rows: list[torch.Tensor], max_new_tokens: int) -> list[str]:
    """Greedy continuation of left-padded input embeddings."""
    L = max(r.shape[0] for r in rows)
    H = rows[0].shape[-1]
    embeds = torch.zeros(len(rows), L, H, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        embeds[b, L - r.shape[0] :] = r
        mask[b, L - r.shape[0] :] = 1
    out = backbone.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.batch_decode(out, skip_special_tokens=True)


@torch.no_grad()
def answer_text(backbone, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    embed = backbone.get_input_embeddings()
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = [embed(torch.tensor(tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]))
                for p in prompts[i : i + batch_size]]  # fmt: skip
        out.extend(generate_from_embeds(backbone, tokenizer, rows, max_new_tokens))
    return out


@torch.no_grad()
def answer_speech(model, tokenizer, feats: list, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    template = SpeechTemplate.from_tokenizer(tokenizer)
    embed = model.embed
    prefix = embed(torch.tensor(template.prefix_ids, dtype=torch.long))
    suffix = embed(torch.tensor(template.suffix_ids, dtype=torch.long))
    out = []
    for i in range(0, len(feats), batch_size):
        chunk = feats[i : i + batch_size]
        T = max(f.shape[0] for f in chunk)
        x = torch.zeros(len(chunk), T, chunk[0].shape[1])
        for b, f in enumerate(chunk):
            x[b, : f.shape[0]] = torch.from_numpy(f.astype("float32"))
        sp, lens = model.speech_embeddings(x, torch.tensor([f.shape[0] for f in chunk]))
        rows = [torch.cat([prefix, sp[b, : lens[b]], suffix]) for b in range(len(chunk))]
        out.extend(generate_from_embeds(model.backbone, tokenizer, rows, max_new_tokens))
    return out


def eval_set(samples_dir: Path, features_dir: Path, split: str = "eval", limit: int | None = None) -> list[dict]:
    """Eval samples with one speech rendition each (the first by name)."""
    feats = {}
    for (sid, rend), f in sorted(load_features(features_dir).items()):
        feats.setdefault(sid, f)
    rows = [r for r in load_samples(samples_dir, split).to_pylist() if r["sample_id"] in feats and r["response"]]
    rows = rows[:limit] if limit else rows
    for r in rows:
        r["speech"] = feats[r["sample_id"]]
    return rows


@torch.no_grad()
def evaluate_student(
    model, tokenizer, rows: list[dict], max_new_tokens: int = 32, subsets: dict[str, set[str]] | None = None
) -> dict:
    """Student text/speech exact match and modality gap; with `subsets` ({name: sample ids}) also per subset."""
    model.eval()
    text = answer_text(model.backbone, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
    speech = answer_speech(model, tokenizer, [r["speech"] for r in rows], max_new_tokens)
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
def evaluate_teacher(teacher: str, rows: list[dict], max_new_tokens: int = 32) -> float:
    """The text teacher's own accuracy (transformers, loaded for evaluation only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    return exact_match(answer_text(model, tok, [r["prompt"] for r in rows], max_new_tokens), [r["response"] for r in rows])


def full_report(model, tokenizer, cache_dir: Path, samples_dir=None, features_dir=None, limit=None) -> dict:
    reader = CacheReader(cache_dir)
    samples_dir, features_dir = inputs_from_manifest(reader, samples_dir, features_dir)
    rows = eval_set(samples_dir, features_dir, limit=limit)
    if not rows:
        raise ValueError(f"no eval samples with speech features under {samples_dir} / {features_dir}")
    report = evaluate_student(model, tokenizer, rows)
    report["teacher_text_accuracy"] = evaluate_teacher(reader.fingerprint["model"], rows)
    report["forgetting"] = report["teacher_text_accuracy"] - report["student_text_accuracy"]
    return report


def format_report(r: dict) -> str:
    lines = [f"eval ({r['n_eval']} questions): teacher text {r['teacher_text_accuracy']:.1%} | student text "
             f"{r['student_text_accuracy']:.1%} | student speech {r['student_speech_accuracy']:.1%} | forgetting "
             f"{r['forgetting']:+.1%} | modality gap {r['modality_gap']:+.1%}"]  # fmt: skip
    for name in ("finetuned", "not_finetuned"):
        if f"{name}_n_eval" in r:
            lines.append(f"  {name.replace('_', ' ')} facts ({r[f'{name}_n_eval']}): student text "
                         f"{r[f'{name}_student_text_accuracy']:.1%} | student speech "
                         f"{r[f'{name}_student_speech_accuracy']:.1%}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from student.model import SpeechLLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, default=Path("data/runs/student/final"))
    parser.add_argument("--logits", type=Path, default=Path("data/cache"), help="cache (for teacher and inputs)")
    parser.add_argument("--samples", type=Path, default=None)
    parser.add_argument("--features", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None, help="only the first N eval questions")
    args = parser.parse_args(argv)
    model = SpeechLLM.load(args.student)
    tokenizer = AutoTokenizer.from_pretrained(args.student / "backbone")
    report = full_report(model, tokenizer, args.logits, args.samples, args.features, args.limit)
    print(format_report(report))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

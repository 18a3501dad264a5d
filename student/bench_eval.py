"""A trained student and its text teacher on a VoiceBench-format benchmark: the same questions typed and spoken.

    python -m student.bench_eval --benchmark data/benchmark                      # the toy world's (make demo)
    python -m student.bench_eval --benchmark ~/voicebench --student runs/omni/final --logits data/cache \\
        --subsets openbookqa,mmsu,bbh,ifeval,advbench,sd-qa,alpacaeval_full,commoneval,wildvoice

For each subset (student/benchmark.py reads it): the teacher answers the text of each question (vLLM, greedy), the
student answers the same text (channel T) and the audio (channel S), greedy; each answer is scored by the subset's
scorer (student/scorers.py: judge-free where one exists; student/judge.py's local judge for open-ended ones).
Reported per subset and overall: teacher text, student text, student speech, forgetting (teacher text - student
text) and the modality gap (student text - student speech), with the number of questions, 95% intervals, and the
fallback / unparsed counts. Written to <out>/report.md and report.json, with every answer (answers.jsonl) and every
raw judgment (judge.jsonl) beside them.

Overall is VoiceBench's: the mean over subsets of each one's score on a 0-100 scale (accuracies and rates x 100, a
judge's 1-5 rating x 20).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import parse_config
from pipeline.errors import cli
from pipeline.files import write_json_atomic, write_text_atomic
from student import scorers
from student.benchmark import Subset, open_benchmark
from student.config import BenchmarkConfig, resolve_device
from student.judge import Generator, judge

CHANNELS = ("teacher_text", "student_text", "student_speech")
METRIC = {"exact": "exact match", "mcq": "accuracy", "bbh": "accuracy", "ifeval": "prompt-level strict accuracy",
          "refusal": "refusal rate", "judge": "judge rating 1-5", "judge-qa": "judge accuracy"}  # fmt: skip


def on_100(scorer: str, value: float) -> float:
    """A subset's score on VoiceBench's 0-100 scale."""
    return value * 20 if scorer == "judge" else value * 100


def score(subset: Subset, answers: list[str], seed: int) -> scorers.Scored:
    """A judge-free subset's scores (the judged ones: student/judge.py)."""
    qs = subset.questions
    refs, ids, prompts = [q.reference for q in qs], [q.id for q in qs], [q.prompt for q in qs]
    if subset.scorer == "exact":
        return scorers.score_exact(answers, refs)
    if subset.scorer == "mcq":
        return scorers.score_mcq(answers, refs, subset.name, ids, seed)
    if subset.scorer == "bbh":
        return scorers.score_bbh(answers, refs, subset.name, ids, seed)
    if subset.scorer == "refusal":
        return scorers.score_refusal(answers)
    if subset.scorer == "ifeval":
        return scorers.score_ifeval(answers, prompts, [q.extra for q in qs])
    raise scorers.UserError(f"subset {subset.name!r}: unknown scorer {subset.scorer!r}")


def interval(scorer: str, s: scorers.Scored) -> tuple[float, float]:
    if scorer == "judge":
        return scorers.mean_interval(s.scored)
    return scorers.wilson_interval(sum(s.scored), s.n)


def speech_inputs(model, waves: list[np.ndarray], feature_cfg) -> list[np.ndarray]:
    """What the student hears: the waveform for a speech LLM with its own processor, else the features the
    training speech had (pipeline.features, stored as float16: the same arrays the final eval reads)."""
    if model.kind == "hf":
        return waves
    from pipeline.features import compute_features

    return [compute_features(torch.from_numpy(w), feature_cfg).to(torch.float16).numpy() for w in waves]


def typed(memo: dict[str, str], answer, prompts: list[str]) -> list[str]:
    """Greedy answers to typed prompts through `memo` (greedy: a question asked again gets the same answer)."""
    todo = list(dict.fromkeys(p for p in prompts if p not in memo))
    if todo:
        memo.update(zip(todo, answer(todo)))
    return [memo[p] for p in prompts]


@torch.no_grad()
def spoken_answers(model, subset: Subset, feature_cfg, max_new_tokens: int, batch_size: int) -> list[str]:
    """The student's greedy answers to a subset's spoken questions, a batch at a time."""
    model.eval()
    qs = subset.questions
    speech = []
    for i in tqdm(range(0, len(qs), batch_size), desc=f"{subset.name}: spoken", leave=False, disable=None):
        waves = [q.waveform(subset.dir) for q in qs[i : i + batch_size]]
        speech.extend(model.answer_speech(speech_inputs(model, waves, feature_cfg), max_new_tokens))
    return speech


def subset_report(subset: Subset, scored: dict[str, scorers.Scored]) -> dict:
    r = {"subset": subset.name, "scorer": subset.scorer, "metric": METRIC[subset.scorer],
         "questions": len(subset.questions)}  # fmt: skip
    for ch in CHANNELS:
        s = scored[ch]
        lo, hi = interval(subset.scorer, s)
        r[ch] = {"score": s.mean, "n": s.n, "ci95": [lo, hi], "fallbacks": s.fallbacks, "unscored": s.unscored,
                 **({"fallback_rate": s.fallbacks / len(s.values)} if subset.scorer in ("mcq", "bbh") else {}),
                 **s.extra}  # fmt: skip
    r["forgetting"] = r["teacher_text"]["score"] - r["student_text"]["score"]
    r["modality_gap"] = r["student_text"]["score"] - r["student_speech"]["score"]
    return r


def overall(rows: list[dict]) -> dict:
    out = {"subsets": len(rows)}
    for ch in CHANNELS:
        vals = [on_100(r["scorer"], r[ch]["score"]) for r in rows if not math.isnan(r[ch]["score"])]
        out[ch] = float(np.mean(vals)) if vals else float("nan")
    out["forgetting"] = out["teacher_text"] - out["student_text"]
    out["modality_gap"] = out["student_text"] - out["student_speech"]
    return out


def _fmt(scorer: str, c: dict) -> str:
    lo, hi = c["ci95"]
    if scorer == "judge":
        cell = f"{c['score']:.2f} [{lo:.2f}, {hi:.2f}]"
    else:
        cell = f"{c['score']:.1%} [{lo:.1%}, {hi:.1%}]"
    notes = []
    if "fallback_rate" in c:
        notes.append(f"fallback {c['fallback_rate']:.0%}")
    if c["unscored"]:
        notes.append(f"unscored {c['unscored']}")
    return cell + (f" ({', '.join(notes)})" if notes else "")


def format_report(report: dict) -> str:
    head = report["run"]
    lines = [f"# Benchmark: {head['benchmark']}", "",
             f"- student: `{head['student']}`", f"- teacher: `{head['teacher']}`", f"- judge: `{head['judge'] or 'none (no open-ended subset)'}`",
             f"- cache fingerprint: `{head['cache_fingerprint']}`", f"- command: `{head['command']}`",
             f"- date: {head['date']}", "",
             "| subset | metric | questions | teacher text | student text | student speech | forgetting | modality gap |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["subsets"]:
        unit = (lambda v: f"{v:+.2f}") if r["scorer"] == "judge" else (lambda v: f"{v:+.1%}")
        lines.append(f"| {r['subset']} | {r['metric']} | {r['questions']} | "
                     + " | ".join(_fmt(r["scorer"], r[ch]) for ch in CHANNELS)
                     + f" | {unit(r['forgetting'])} | {unit(r['modality_gap'])} |")  # fmt: skip
    o = report["overall"]
    lines.append(f"| **overall** (0-100) | mean of subsets | {sum(r['questions'] for r in report['subsets'])} | "
                 f"{o['teacher_text']:.1f} | {o['student_text']:.1f} | {o['student_speech']:.1f} | "
                 f"{o['forgetting']:+.1f} | {o['modality_gap']:+.1f} |")  # fmt: skip
    lines += ["", "Intervals: 95% (Wilson for accuracies and rates, normal for judge ratings). Fallback: answers "
              "whose choice could not be read (a draw seeded by --seed and the question id stood in). Unscored: "
              "judgments that could not be parsed, or ifeval checks that could not run (left out of n)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_benchmark(cfg: BenchmarkConfig, argv: list[str] | None = None, llm=None, student=None) -> dict:
    """The whole evaluation; `llm`: a vLLM engine already serving the teacher (tests share one)."""
    from datetime import datetime, timezone

    from transformers import AutoTokenizer

    from pipeline.cache import CacheReader
    from pipeline.engine import make_engine
    from pipeline.features import feature_config_of
    from pipeline.teacher_config import TeacherConfig
    from student.interface import load_student

    subsets = open_benchmark(cfg.benchmark, list(cfg.subsets) or None, list(cfg.splits) or None, cfg.limit)
    reader = CacheReader(cfg.logits) if cfg.logits else None
    teacher = cfg.teacher or reader.teacher
    judge_id = cfg.judge or teacher
    model = student if student is not None else load_student(cfg.student, verify=cfg.verify)
    model = model.to(resolve_device(cfg.device))
    feature_cfg = None
    if model.kind != "hf":
        features = cfg.features or (reader.input_path("features_dir") if reader else None)
        if not features:
            raise scorers.UserError("a composed student hears features: pass --features (the training speech's "
                                    "features directory) or --logits (its cache names them)")  # fmt: skip
        feature_cfg = feature_config_of(Path(features))
    out_dir = Path(cfg.out) if cfg.out else Path(cfg.student).parent / "benchmark"
    out_dir.mkdir(parents=True, exist_ok=True)

    engines: dict[str, Generator] = {}
    templates = {"judge": Path(cfg.judge_prompt).read_text() if cfg.judge_prompt else None,
                 "judge-qa": Path(cfg.judge_qa_prompt).read_text() if cfg.judge_qa_prompt else None}  # fmt: skip

    def engine_for(model_id: str) -> Generator:
        if model_id not in engines:
            if llm is not None and model_id == teacher:
                engine = llm
            else:
                engine = make_engine(TeacherConfig(teacher=model_id, dtype=cfg.dtype, kv_cache_gib=cfg.kv_cache_gib))
            engines[model_id] = Generator(engine, AutoTokenizer.from_pretrained(model_id))
        return engines[model_id]

    rows, answer_lines, judge_lines = [], [], []
    teacher_typed: dict[str, str] = {}  # typed answers by question text: subsets that share questions (the toy
    student_typed: dict[str, str] = {}  # export's held-out sets speak the same ones) are answered once
    for subset in subsets:
        print(f"{subset.name}: {len(subset.questions)} questions, scored by {subset.scorer}", flush=True)
        prompts = [q.prompt for q in subset.questions]
        answers = {"teacher_text": typed(teacher_typed, lambda ps: engine_for(teacher).answer(ps, cfg.max_new_tokens),
                                         prompts)}  # fmt: skip
        too_long = sum(a is None for a in answers["teacher_text"])
        if too_long:  # scored as an empty answer (it answers nothing), and said
            print(f"note: {subset.name}: {too_long} question(s) longer than the teacher's context; scored as no answer")
            answers["teacher_text"] = [a or "" for a in answers["teacher_text"]]
        answers["student_text"] = typed(student_typed, lambda ps: model.answer_text(ps, cfg.max_new_tokens,
                                                                                    cfg.batch_size), prompts)  # fmt: skip
        answers["student_speech"] = spoken_answers(model, subset, feature_cfg, cfg.max_new_tokens, cfg.batch_size)
        scored = {}
        for ch in CHANNELS:
            if subset.scorer in ("judge", "judge-qa"):
                s, raw = judge(engine_for(judge_id), subset.scorer, prompts, answers[ch],
                               [q.reference for q in subset.questions], cfg.judge_max_new_tokens,
                               templates[subset.scorer])  # fmt: skip
                judge_lines += [{"subset": subset.name, "split": q.split, "id": q.id, "channel": ch,
                                 "answer": a, "judgment": j, "score": d["parsed"]}
                                for q, a, j, d in zip(subset.questions, answers[ch], raw, s.details)]  # fmt: skip
            else:
                s = score(subset, answers[ch], cfg.seed)
            scored[ch] = s
        for i, q in enumerate(subset.questions):
            line = {"subset": subset.name, "split": q.split, "row": q.row, "id": q.id, "prompt": q.prompt,
                    "reference": q.reference}  # fmt: skip
            for ch in CHANNELS:
                line[ch] = answers[ch][i]
                line[f"{ch}_score"] = None if math.isnan(scored[ch].values[i]) else scored[ch].values[i]
                if scored[ch].details:
                    line[f"{ch}_detail"] = scored[ch].details[i]
            answer_lines.append(line)
        rows.append(subset_report(subset, scored))
    fingerprint = None
    if reader is not None:  # the manifest's fingerprint, as one digest (the manifest holds it in full)
        import hashlib

        fingerprint = hashlib.sha256(json.dumps(reader.fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    report = {
        "run": {"benchmark": str(cfg.benchmark), "student": str(cfg.student), "teacher": teacher, "judge": judge_id
                if any(r["scorer"].startswith("judge") for r in rows) else None,
                "cache": str(cfg.logits) if cfg.logits else None, "cache_fingerprint": fingerprint,
                "command": "python -m student.bench_eval " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seed": cfg.seed,
                "max_new_tokens": cfg.max_new_tokens},
        "subsets": rows, "overall": overall(rows),
    }  # fmt: skip
    write_text_atomic(out_dir / "answers.jsonl", "".join(json.dumps(x) + "\n" for x in answer_lines))
    if judge_lines:
        write_text_atomic(out_dir / "judge.jsonl", "".join(json.dumps(x) + "\n" for x in judge_lines))
    write_json_atomic(out_dir / "report.json", report)
    write_text_atomic(out_dir / "report.md", format_report(report))
    for engine in engines.values():
        if engine.llm is not llm:
            from pipeline.engine import shutdown_engine

            shutdown_engine(engine.llm)
    report["out"] = str(out_dir)
    return report


@cli("bench_eval")
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BenchmarkConfig, argv, description=__doc__).validate()
    report = run_benchmark(cfg, argv)
    print(format_report(report))
    print(f"written: {report['out']}/report.md, report.json, answers.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())

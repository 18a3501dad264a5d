"""Quality at equal storage: dense vs top-k vs sampled (RS-KD) teacher targets, the same student budget for each.

    python -m bench.targets_quality --seeds 3        # after make demo; bench/results/targets_quality.{json,md}
    python -m bench.targets_quality --render bench/results/targets_quality.json

1. Caches the embedded toy teacher's targets over data/samples (every split) once per variant, one vLLM engine for
   all of them (data/bench/targets/<variant>): dense (top-k with k = the whole vocabulary: the full distribution,
   quantized like any top-k), top-8, top-64, and sampled N = 8, 12, 24 (drawn at T = 1). Bytes per response token:
   the cache's shards over its response tokens.
2. Per seed: one speech alignment (the paper table's recipe, configs/paper_table.toml: the toy encoder, ctc-embed, --align ctc, backbone
   frozen), then, from it, the same fine-tuning per variant (paper_table's row 4: T->T and S->T KD + CE on the
   spoken channel, half of the facts; same steps, batches, learning rates, seed), at tau = 1 for every variant (the
   draws' temperature: all of them then target the same distribution), --kd forward_kl for dense and top-k,
   --kd sampled (RS-KD's estimator) for sampled.
3. Per student, on the eval split (held-out templates; the first --eval-limit questions): KL(teacher || student) per
   response position at T = 1, the teacher's exact full distribution (a transformers forward of the teacher on
   the typed prompt) against the student's on the typed prompt (text) and on the spoken one (speech); and exact
   match of its greedy answers, typed and spoken.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from bench.paper_table import RECIPE, PaperTableBench
from bench.report import read_results, stamp, write_results
from pipeline import schemas
from pipeline.cache import CacheReader
from pipeline.config import ConfigError, config_from_args, listed, load_config_file, opt, parse_args
from pipeline.errors import run_cli
from student.config import TrainConfig

WORK = Path("data/bench/targets")
# name -> the teacher stage's settings (k = 0: the whole vocabulary)
VARIANTS = {
    "dense": dict(targets="topk", top_k=0),
    "top-8": dict(targets="topk", top_k=8),
    "top-64": dict(targets="topk", top_k=64),
    "sampled-8": dict(targets="sampled", draws=8),
    "sampled-12": dict(targets="sampled", draws=12),
    "sampled-24": dict(targets="sampled", draws=24),
}


def vocab_size(teacher: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(teacher).vocab_size


def build_caches(names: list[str], samples: Path, features: Path, teacher: str | None) -> dict[str, dict]:
    """Each variant's cache (made once; a complete one is kept), with its bytes per response token."""
    from pipeline.teacher import cache_teacher_logits, make_engine
    from pipeline.teacher_config import TeacherConfig

    base = TeacherConfig(samples=str(samples), features=str(features), teacher=teacher, draw_temperature=1.0)
    vocab = vocab_size(base.model)
    engine = None
    info = {}
    for name in names:
        settings = dict(VARIANTS[name])
        if settings.get("top_k") == 0:
            settings["top_k"] = vocab
        cfg = replace(base, out=str(WORK / name / "cache"), **settings).validate()
        if not (cfg.out_dir / "last_run.json").exists():
            if engine is None:
                engine = make_engine(cfg, top_k=vocab)
            t0 = time.monotonic()
            summary = cache_teacher_logits(cfg, progress=False, llm=engine)
            print(f"cached {name}: {summary['cached_now']} samples in {time.monotonic() - t0:.0f} s", file=sys.stderr,
                  flush=True)  # fmt: skip
        reader = CacheReader(cfg.out_dir)
        tokens = sum(len(r["token_ids"]) for r in reader.iter_rows(columns=["token_ids"]))
        size = sum(e["bytes"] for e in reader.shard_entries.values())
        info[name] = {"cache": str(cfg.out_dir), "bytes_per_token": size / tokens, "tokens": tokens,
                      "targets": reader.targets}  # fmt: skip
    return info


@torch.no_grad()
def heldout_kl(model, teacher_model, data, limit: int, batch_size: int = 32) -> dict[str, float]:
    """Mean KL(teacher || student) per response position at T = 1 over the first `limit` examples of `data`: the
    student on the typed prompt (text) and on the spoken one (speech), the teacher on the typed prompt."""
    import torch.nn.functional as F

    from student.data import collate, gather_positions

    model.eval()
    totals, positions = {"text": 0.0, "speech": 0.0}, 0
    for start in range(0, min(limit, len(data)), batch_size):
        idx = range(start, min(start + batch_size, limit, len(data)))
        b = collate([data.example(i, targets=False) for i in idx], 0)
        mask = b["mask"]
        t = gather_positions(teacher_model(input_ids=b["text_ids"], attention_mask=b["text_attention"]).logits,
                             b["text_response_pos"]).float().log_softmax(-1)  # fmt: skip
        weight, bias = model.head()
        for key, channel in (("text", "T"), ("speech", "S")):
            s = F.linear(model.response_hidden(b, channel), weight, bias).float().log_softmax(-1)
            totals[key] += (t.exp() * (t - s)).sum(-1)[mask].sum().item()
        positions += int(mask.sum())
    return {key: value / positions for key, value in totals.items()}


def run_student(name: str, cache: str, base, aligned: Path, runs: Path, limit: int, teacher_model) -> dict:
    """Fine-tune from the aligned checkpoint against `cache`'s targets; its held-out KL and exact match."""
    from transformers import AutoTokenizer

    from student.data import StudentData
    from student.evaluate import eval_set, evaluate_student
    from student.model import SpeechLLM
    from student.train import train

    sampled = CacheReader(cache, verify=False).targets == "sampled"
    cfg = replace(base, logits=cache, out=str(runs / name), resume=base.align_steps > 0,
                  kd="sampled" if sampled else "forward_kl", tau=1.0)  # fmt: skip
    shutil.rmtree(cfg.out, ignore_errors=True)
    if base.align_steps:
        shutil.copytree(aligned, cfg.out)
    t0 = time.monotonic()
    train(cfg, progress=False, final_eval=False)
    minutes = (time.monotonic() - t0) / 60
    model = SpeechLLM.load(Path(cfg.out) / "final").eval()
    tok = AutoTokenizer.from_pretrained(Path(cfg.out) / "final" / "backbone")
    data = StudentData.open(cache, tok, split="eval")
    kl = heldout_kl(model, teacher_model, data, limit)
    match = evaluate_student(model, eval_set(data.samples, data.inputs.speech, limit=limit))
    return {"kl_text": kl["text"], "kl_speech": kl["speech"], "text": match["student_text_accuracy"],
            "speech": match["student_speech_accuracy"], "minutes": round(minutes, 2)}  # fmt: skip


def _stat(values: list[float], fmt: str) -> str:
    text = format(statistics.fmean(values), fmt)
    return text + (f" ± {format(statistics.stdev(values), fmt.replace('+', ''))}" if len(values) > 1 else "")


def render(report: dict) -> str:
    head = ("| targets | bytes/token | held-out KL, text (nats/token) | held-out KL, speech (nats/token) | "
            "KL text / speech minus top-64's, same seed | text exact match | speech exact match | "
            "fine-tune minutes |")  # fmt: skip
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    ref = {r["seed"]: r for r in report["runs"] if r["variant"] == "top-64"}
    for name, cache in report["caches"].items():
        runs = [r for r in report["runs"] if r["variant"] == name]
        if not runs:
            continue
        paired = [r for r in runs if r["seed"] in ref]
        versus = "-" if name == "top-64" or not paired else " / ".join(
            _stat([r[key] - ref[r["seed"]][key] for r in paired], '+.4f') for key in ("kl_text", "kl_speech"))
        lines.append(f"| {name} | {cache['bytes_per_token']:.1f} | {_stat([r['kl_text'] for r in runs], '.4f')} | "
                     f"{_stat([r['kl_speech'] for r in runs], '.4f')} | {versus} | "
                     f"{_stat([r['text'] * 100 for r in runs], '.1f')}% | "
                     f"{_stat([r['speech'] * 100 for r in runs], '.1f')}% | "
                     f"{statistics.fmean(r['minutes'] for r in runs):.1f} |")  # fmt: skip
    seeds = sorted({r["seed"] for r in report["runs"]})
    lines.append("")
    lines.append(f"seeds: {', '.join(map(str, seeds))} (mean ± sample std over {len(seeds)}); eval: the first "
                 f"{report['eval_limit']} eval-split questions")  # fmt: skip
    return "\n".join(lines)


# this bench's own setting of the paper table's recipe (configs/paper_table.toml): both KD channels, 150
# fine-tuning steps, no held-out sets
SETTING = {"steps": 550, "align_steps": 400, "alpha": 0.5, "beta": 0.5, "out": str(WORK / "runs"),
           "heldout_features": "", "heldout_tts_features": ""}  # fmt: skip
SKIPPED = ("resume", "stop_after", "logits", "kd", "tau")  # TrainConfig fields the bench sets per variant


@dataclass
class TargetsQualityBench:
    variants: list[str] = listed(tuple(VARIANTS), "target variants to compare")
    seeds: int = opt(3, "seeds --seed, --seed+1, ... (alignment included)")
    eval_limit_kl: int = opt(300, "eval questions for the KL and exact match")
    teacher: str | None = opt(None, "the teacher (default: the embedded toy teacher)")
    render: str | None = opt(None, "only print the table of a targets_quality.json")
    caches_only: bool = opt(False, "build the caches, print their info as JSON")


def main(argv: list[str] | None = None) -> int:
    own = {f.name for f in fields(TrainConfig)} - set(SKIPPED)  # the recipe's student options (not its bench's)
    recipe = {k: v for k, v in load_config_file(RECIPE, [TrainConfig, PaperTableBench]).items() if k in own}
    args = parse_args((TrainConfig, SKIPPED), TargetsQualityBench, argv=argv, description=__doc__,
                      defaults={**recipe, **SETTING})  # fmt: skip
    bench = config_from_args(TargetsQualityBench, args)
    if bench.render:
        print(render(read_results(Path(bench.render).stem, Path(bench.render).parent)))
        return 0
    names = bench.variants
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise ConfigError(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    samples, features = Path(args.samples or schemas.SAMPLES_DIR), Path(args.features or schemas.FEATURES_DIR)
    if bench.caches_only:
        print(json.dumps(build_caches(names, samples, features, bench.teacher)))
        return 0
    # the caches in a child process: a process that ran a vLLM CPU engine cannot fork DataLoader workers (its
    # OpenMP runtime hangs in the child)
    cmd = [sys.executable, "-m", "bench.targets_quality", "--caches-only", "--variants", ",".join(names),
           "--samples", str(samples), "--features", str(features)] + (["--teacher", bench.teacher] if bench.teacher
                                                                     else [])  # fmt: skip
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    caches = json.loads(done.stdout.strip().splitlines()[-1])
    from transformers import AutoModelForCausalLM

    teacher = bench.teacher or str(schemas.TEACHER_DIR)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    run = stamp(argv)
    report = {"caches": caches, "runs": [], "eval_limit": bench.eval_limit_kl,
              "setting": {k: v for k, v in vars(args).items() if k != "render"}}  # fmt: skip
    for seed in range(args.seed, args.seed + bench.seeds):
        runs = Path(args.out) / f"seed{seed}"
        # alignment reads no target values (--align ctc): any cache names its examples; the smallest decodes fastest
        smallest = min(names, key=lambda n: caches[n]["bytes_per_token"])
        base = config_from_args(TrainConfig, args, logits=caches[smallest]["cache"], out=str(runs / "aligned"),
                                seed=seed)  # fmt: skip
        if base.align_steps:
            t0 = time.monotonic()
            train_aligned(replace(base, steps=base.align_steps))
            print(f"seed {seed}: aligned in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
        for name in names:
            r = run_student(name, caches[name]["cache"], base, runs / "aligned", runs, bench.eval_limit_kl,
                            teacher_model)  # fmt: skip
            r.update(variant=name, seed=seed)
            report["runs"].append(r)
            write_results("targets_quality", report, render(report), run)
            print(f"seed {seed} {name}: KL text {r['kl_text']:.4f}, speech {r['kl_speech']:.4f}; exact match text "
                  f"{r['text']:.1%}, speech {r['speech']:.1%} ({r['minutes']:.1f} min)", flush=True)  # fmt: skip
    table = render(report)
    write_results("targets_quality", report, table, run)
    print(table)
    return 0


def train_aligned(cfg) -> None:
    """The shared alignment phase (the backbone frozen: it does not read the targets' values)."""
    from student.train import train

    train(cfg, progress=False, final_eval=False)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench.targets_quality"))

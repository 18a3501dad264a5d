"""The Prefect flow `cache-teacher`: samples -> speech -> features -> teacher logit cache.

Run it directly (Prefect starts a temporary local server for the run):

    python flows/cache_teacher.py                       # the embedded default
    python flows/cache_teacher.py --teacher Qwen/Qwen2.5-7B-Instruct --source my.jsonl --responses teacher

Or serve it as a deployment against a Prefect server:

    prefect server start --host 127.0.0.1 &             # then, in this shell:
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/cache_teacher.py --serve default &      # keeps serving
    prefect deployment run cache-teacher/default --watch

Every task is resumable (each stage skips the work already on disk), so
Prefect's retries continue where a failure stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# The temporary server of a direct run otherwise races its own SQLite on telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from pipeline import features as features_stage
from pipeline import schemas
from pipeline import samples as samples_stage
from pipeline import speech as speech_stage
from toy import encoder as toy_encoder
from toy import teacher as toy_teacher
from pipeline.errors import UserError, cli
from pipeline.teacher import CacheRunConfig, EngineConfig, cache_teacher_logits, format_summary

FLOW_NAME = "cache-teacher"
HELDOUT_VOICE = toy_encoder.EncoderBuildConfig.heldout_voice  # the voice the toy encoder never hears either
HELDOUT_RATE = 160


def retry_unless_config_error(task, task_run, state) -> bool:
    """Retry transient failures; a missing file or a wrong value fails at once."""
    try:
        state.result()
    except (UserError, FileNotFoundError, ValueError):  # bad input, mismatch, corrupt data: retrying cannot help
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True


@task(name="prepare-samples")
def prepare_samples(source: str, samples_dir: Path, split: str) -> dict:
    result = samples_stage.ingest(source, samples_dir, default_split=split, progress=False)
    return {"accepted": result.samples.num_rows, "rejected": result.rejects.num_rows}


def build_once(fixture, out_dir: Path, build) -> tuple[dict, str]:
    """A toy fixture's build report: read when a complete build is there, else from `build()`."""
    if fixture.is_built(out_dir):
        return json.loads((Path(out_dir) / fixture.BUILD_REPORT).read_text()), "already built"
    report = build()
    return report, f"built in {report['seconds'] / 60:.1f} min"


@task(name="build-default-teacher")
def build_default_teacher(samples_dir: Path, teacher_dir: Path) -> str:
    """The embedded toy teacher, trained once and reused."""
    report, how = build_once(toy_teacher, teacher_dir, lambda: toy_teacher.build_teacher(
        samples_dir, teacher_dir, toy_teacher.TeacherConfig(), progress=False))  # fmt: skip
    print(f"toy teacher ({how}): eval exact match {report['eval_accuracy']:.1%} on {report['n_eval']} "
          f"held-out-template questions -> {teacher_dir}")
    return str(teacher_dir)


@task(name="build-default-encoder")
def build_default_encoder(samples_dir: Path, encoder_dir: Path) -> dict:
    """The embedded speech encoder (the toy's Whisper: phoneme CTC on pseudo-names), built once and reused."""
    report, how = build_once(toy_encoder, encoder_dir, lambda: toy_encoder.build_encoder(
        samples_dir, encoder_dir, toy_encoder.EncoderBuildConfig(), progress=False))  # fmt: skip
    print(f"toy speech encoder ({how}): phoneme error {report['heldout_per']:.1%} on never-heard names, "
          f"{report.get('heldout_voice_per', float('nan')):.1%} in the never-heard voice "
          f"{report.get('heldout_voice', '?')} -> {encoder_dir}")  # fmt: skip
    return report


@task(name="synthesize-speech", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_config_error)
def synthesize_speech(samples_dir: Path, audio_dir: Path, voices: list[str], rates: list[int], per_sample: int,
                      split: str | None = None) -> dict:  # fmt: skip
    r = speech_stage.synthesize_all(samples_dir, audio_dir, voices=tuple(voices), rates=tuple(rates),
                                    per_sample=per_sample, progress=False, split=split)  # fmt: skip
    return {"clips": r.index.num_rows, "synthesized": r.synthesized, "rejected": r.rejects.num_rows}


@task(name="extract-features", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_config_error)
def extract_features(audio_dir: Path, features_dir: Path, n_mels: int) -> dict:
    r = features_stage.extract_all(audio_dir / speech_stage.INDEX_FILE, features_dir,
                                   features_stage.FeatureConfig(n_mels=n_mels), progress=False)  # fmt: skip
    return {"extracted": r.written, "already_there": r.skipped, "rejected": r.rejects.num_rows}


@task(name="cache-teacher-logits", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_config_error)
def cache_logits(cfg: CacheRunConfig) -> dict:
    summary = cache_teacher_logits(cfg, progress=False)
    print(format_summary(summary))
    return summary


def summary_markdown(samples: dict, speech: dict, feats: dict, cache: dict, heldout: dict | None = None,
                     encoder: dict | None = None) -> str:  # fmt: skip
    extra = ""
    if heldout:
        extra += (f"| held-out voice (eval split) | {heldout['clips']} clips, {heldout['extracted']} features "
                  f"extracted, {heldout['rejected']} rejected |\n")  # fmt: skip
    if encoder:
        extra += (f"| toy speech encoder | phoneme error {encoder['heldout_per']:.1%} on never-heard names after "
                  f"{encoder['steps']} steps ({encoder['seconds'] / 60:.1f} min) |\n")  # fmt: skip
    reasons = "\n".join(f"| {reason} | {n} |" for reason, n in sorted(cache["rejects_by_reason"].items()))
    return f"""# cache-teacher run

| stage | result |
|---|---|
| samples | {samples['accepted']} accepted, {samples['rejected']} rejected |
| speech | {speech['clips']} clips ({speech['synthesized']} new), {speech['rejected']} rejected |
| features | {feats['extracted']} extracted, {feats['already_there']} already there, {feats['rejected']} rejected |
| teacher cache | {cache['cached_now']} cached now ({cache.get('rescored_changed', 0)} re-scored: changed since cached), {cache['already_cached']} already there, {cache['rejected']} rejected |
| response tokens cached | {cache['tokens_cached']} |
| tokens/s (scored, engine start excluded) | {cache['tokens_per_second']} |
| bytes per cached token | {cache['bytes_per_cached_token']} |
| cache | `{cache['cache_dir']}` ({cache['cache_rows']} rows, {cache['cache_bytes']} bytes, top-{cache['top_k']}) |
{extra}
Cache rejects by reason:

| reason | count |
|---|---|
{reasons or '| (none) | 0 |'}
"""


@flow(name=FLOW_NAME, log_prints=True)
def cache_teacher(
    data_dir: str = "data",
    source: str = samples_stage.TOY_WORLD,
    split: str = "train",
    teacher: str | None = None,
    top_k: int = 64,
    responses: str = "dataset",
    max_new_tokens: int = 256,
    voices: list[str] = list(speech_stage.DEFAULT_VOICES),
    rates: list[int] = list(speech_stage.DEFAULT_RATES),
    per_sample: int = 1,
    heldout_voice: str | None = HELDOUT_VOICE,
    default_encoder: bool = True,
    n_mels: int = 80,
    dtype: str = "auto",
    max_model_len: int | None = None,
    kv_cache_gib: float = 2.0,
    limit: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Cache the teacher's top-k logprobs over every sample's response, with its speech features.

    `teacher`: a local HF model dir or a Hugging Face id; default: the embedded
    toy teacher, trained on the samples if `<data_dir>/models/teacher` is missing.
    `split`: the split of source rows that carry none.
    `heldout_voice`: also speak the eval split in this voice (never a training voice), for the student's
    held-out-voice column (`<data_dir>/features-heldout-voice`); None: not.
    `default_encoder`: on the toy world, also build the embedded pretrained speech encoder
    (`<data_dir>/models/encoder`) that `student/train.py --encoder` starts from.
    """
    if heldout_voice and heldout_voice in voices:
        raise UserError(f"--heldout-voice {heldout_voice} is also a training voice (--voices {','.join(voices)}); "
                        f"pick a voice the training speech does not use, or --heldout-voice ''")  # fmt: skip
    data = Path(data_dir)
    samples_dir, audio_dir, features_dir = data / "samples", data / "audio", data / "features"
    samples = prepare_samples(source, samples_dir, split)
    model = teacher or build_default_teacher(samples_dir, data / "models" / "teacher")
    speech = synthesize_speech(samples_dir, audio_dir, voices, rates, per_sample)
    feats = extract_features(audio_dir, features_dir, n_mels)
    heldout = None
    if heldout_voice:
        held_audio = data / ("audio" + schemas.HELDOUT_VOICE_SUFFIX)
        held_features = data / ("features" + schemas.HELDOUT_VOICE_SUFFIX)
        held_speech = synthesize_speech(samples_dir, held_audio, [heldout_voice], [HELDOUT_RATE], 1, split="eval")
        heldout = {**held_speech, **extract_features(held_audio, held_features, n_mels)}
    cfg = CacheRunConfig(
        samples_dir=samples_dir, out_dir=data / "cache", features_dir=features_dir, top_k=top_k, responses=responses,
        max_new_tokens=max_new_tokens, limit=limit, overwrite=overwrite,
        engine=EngineConfig(model=model, dtype=dtype, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib),
    )  # fmt: skip
    cache = cache_logits(cfg)
    encoder = None
    if default_encoder and source == samples_stage.TOY_WORLD:
        encoder = build_default_encoder(samples_dir, data / "models" / "encoder")
    create_markdown_artifact(
        key="cache-teacher-summary", markdown=summary_markdown(samples, speech, feats, cache, heldout, encoder),
        description="speechkd cache-teacher run summary",
    )  # fmt: skip
    return {"samples": samples, "speech": speech, "features": feats, "cache": cache, "heldout_voice": heldout,
            "encoder": encoder}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", metavar="DEPLOYMENT", help="serve the flow as this deployment instead of running it")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--source", default=samples_stage.TOY_WORLD, help="toy-world | .jsonl | .parquet | HF dataset")
    parser.add_argument("--split", default="train", help="split of source rows that carry none")
    parser.add_argument("--teacher", default=None, help="HF model dir or id (default: the embedded toy teacher)")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--responses", choices=["dataset", "teacher"], default="dataset")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--voices", default=",".join(speech_stage.DEFAULT_VOICES))
    parser.add_argument("--rates", default=",".join(map(str, speech_stage.DEFAULT_RATES)))
    parser.add_argument("--per-sample", type=int, default=1, help="speech renditions per sample")
    parser.add_argument("--heldout-voice", default=HELDOUT_VOICE,
                        help="also speak the eval split in this voice, never a training one ('': not)")
    parser.add_argument("--no-default-encoder", dest="default_encoder", action="store_false",
                        help="on the toy world, do not build the embedded pretrained speech encoder")
    parser.add_argument("--n-mels", type=int, default=80)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--limit", type=int, default=None, help="cache only the first N samples")
    parser.add_argument("--overwrite", action="store_true")
    return parser


@cli("cache_teacher.py")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    params = {k: v for k, v in vars(args).items() if k != "serve"}
    params["voices"] = [v for v in args.voices.split(",") if v]
    params["rates"] = [int(r) for r in args.rates.split(",") if r]
    params["heldout_voice"] = args.heldout_voice or None
    if args.serve:
        cache_teacher.serve(name=args.serve, parameters=params)
        return 0
    result = cache_teacher(**params)
    c = result["cache"]
    print(format_summary(c))
    print(f"cache: {Path(c['cache_dir']).resolve()} — inspect it with: python -m pipeline.query --views")
    return 0


if __name__ == "__main__":
    sys.exit(main())

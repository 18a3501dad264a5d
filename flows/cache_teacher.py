"""The Prefect flow `cache-teacher`: samples -> speech -> features -> teacher logit cache.

Run it directly (Prefect starts a temporary local server for the run):

    python flows/cache_teacher.py                       # the embedded default
    python flows/cache_teacher.py --teacher Qwen/Qwen2.5-7B-Instruct --source my.jsonl --responses teacher

Cache on several workers (Ray, through prefect-ray's RayTaskRunner): the cache is split into `--partitions`
hash partitions and one Ray task per partition scores it with its own vLLM engine, `--workers` at a time:

    python flows/cache_teacher.py --workers 2 --partitions 2                     # a local Ray cluster
    python flows/cache_teacher.py --ray-address auto --workers 16 --partitions 64 --tensor-parallel-size 1

Or serve it as a deployment against a Prefect server:

    prefect server start --host 127.0.0.1 &             # then, in this shell:
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/cache_teacher.py --serve default &      # keeps serving
    prefect deployment run cache-teacher/default --watch --param workers=2 --param partitions=2

The flow's parameters are the fields of `CacheFlowConfig` (this file) and of the teacher stage's
`pipeline.teacher_config.TeacherConfig`: one declaration gives the CLI flags, the flow's parameters and a
deployment's defaults. Every task is resumable (each stage skips the work already on disk), so Prefect's
retries continue where a failure stopped; a caching worker killed outright is re-run by Ray, and continues
its partition.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

# The temporary server of a direct run otherwise races its own SQLite on telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A fresh Prefect home migrates its SQLite database before the temporary server answers: ~23 s on a 2-vCPU box,
# past Prefect's 20 s default on a loaded one (the flow then dies before doing anything). Wait longer unless told.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# A vLLM engine reconfigures Python logging when it starts (logging.config.dictConfig), which flushes every handler
# while holding logging's lock; inside a Prefect run one of them is Prefect's API log handler, whose flush waits for a
# worker thread that needs that same lock: a deadlock (a fresh-clone `make demo` hung there for 12 minutes; py-spy:
# MainThread in LLM.__init__ -> dictConfig -> APILogHandler.flush -> drain_all, the log worker in
# logging._acquireLock). In the flow, and in its Ray workers, logging is Prefect's: vLLM leaves it alone.
VLLM_LOGGING = {"VLLM_CONFIGURE_LOGGING": "0"}
for _key, _value in VLLM_LOGGING.items():
    os.environ.setdefault(_key, _value)

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed

from pipeline import features as features_stage
from pipeline import schemas
from pipeline import samples as samples_stage
from pipeline import speech as speech_stage
from pipeline.cache import read_manifest
from pipeline.chat import SPEAK
from pipeline.config import ConfigError, flow_parameters, listed, opt, parse_args
from pipeline.engine import check_platform, on_cpu
from pipeline.errors import UserError, cli
from pipeline.teacher import cache_teacher_logits, prepare_cache
from pipeline.teacher_config import TeacherConfig
from pipeline.teacher_report import combine_summaries, format_phases, format_summary
from toy import encoder as toy_encoder
from toy import teacher as toy_teacher
from toy import world as toy_world

FLOW_NAME = "cache-teacher"
HELDOUT_RATE = 160
REPO = Path(__file__).resolve().parents[1]


@dataclass
class CacheFlowConfig:
    """The flow's own options (the teacher stage's are TeacherConfig's)."""

    data_dir: str = opt("data", "where every stage writes: samples/, audio/, features/, cache/, models/, rejects/")
    source: str = opt(toy_world.SOURCE_NAME, "toy-world (the embedded default, written to <data-dir>/raw first) | "
                                             ".jsonl | .parquet | a Hugging Face dataset")  # fmt: skip
    split: str = opt("train", "split of source rows that carry none")
    tts: str = opt("espeak-ng+festival", "text-to-speech: espeak-ng, festival, flite, several joined by '+' (each "
                                         "clip spoken by one, in equal shares), or vits (a VITS model from "
                                         "transformers, --tts-model; on a GPU when there is one)")  # fmt: skip
    tts_model: str | None = opt(None, f"with --tts vits: a Hugging Face id or local directory of a VITS model "
                                      f"(default {speech_stage.DEFAULT_VITS_MODEL}, 109 speakers)")  # fmt: skip
    voices: list[str] = listed((), "voices of the training speech, one drawn per clip (default: the TTS's own: "
                                   "espeak-ng 7 English accents x 14 variants, festival ked_diphone and "
                                   "cmu_us_slt_arctic_hts (in a mix: festival:ked_diphone), vits every speaker but "
                                   "the last)")  # fmt: skip
    rates: list[int] = listed(speech_stage.DEFAULT_RATES, "speaking rates (words per minute)")
    per_sample: int = opt(1, "speech renditions per sample")
    perturb_train: float = opt(0.0, "share of the train split's training-voice clips perturbed after synthesis "
                                    "(speed, white noise, a training room, dither: pipeline.augment), so the "
                                    "student's alignment hears more than clean audio; 0: none")  # fmt: skip
    speak: str = opt("last-user", "which user turns of a conversation are spoken: the last, or all-user (system "
                                  "prompts and assistant turns stay text)", choices=SPEAK)  # fmt: skip
    heldout_voice: str | None = opt("auto", "also speak the eval split in this voice, never a training one ('auto': "
                                            "the TTS's own, espeak-ng en-029, vits its last speaker, flite none; "
                                            "'': none)")  # fmt: skip
    heldout_tts: str = opt("auto", "also speak the eval split with this other synthesizer, in its default voices: "
                                   "one the training speech and the toy encoder never heard ('auto': the first of "
                                   "flite, festival, espeak-ng that --tts does not use; '': none)",
                           choices=("", "auto", *sorted(speech_stage.BACKENDS)))  # fmt: skip
    default_encoder: bool = opt(True, "on the toy world, also build the embedded pretrained speech encoder")
    n_mels: int = opt(80, "log-mel bins of the speech features")
    workers: int = opt(1, "caching workers: 1 = in this process, no Ray; N > 1 = Ray tasks (prefect-ray), one per "
                          "partition, N at a time, each with its own vLLM engine")  # fmt: skip
    ray_address: str | None = opt(None, "join this Ray cluster (`auto` on a node of it, or the head's host:port) "
                                        "instead of starting a local one; implies Ray even with --workers 1")  # fmt: skip
    cpus_per_worker: int | None = opt(None, "CPUs a caching worker claims from Ray (default: on CPU the machine's "
                                            "CPUs / --workers, on GPU 1)")  # fmt: skip

    def validate(self) -> "CacheFlowConfig":
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        try:
            speech_stage.TrainPerturbation(self.perturb_train)  # its own range check, before any work
        except UserError as exc:
            raise ConfigError(str(exc)) from exc
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise ConfigError(f"--cpus-per-worker must be >= 1, got {self.cpus_per_worker}")
        try:
            families = speech_stage.families_of(self.tts)
        except UserError as exc:
            raise ConfigError(f"--tts {self.tts}: {exc}") from exc
        if self.heldout_tts and self.heldout_tts in families:
            raise ConfigError(f"--heldout-tts {self.heldout_tts} is a synthesizer of the training speech (--tts "
                              f"{self.tts}): a held-out synthesizer must be one it never used; pick another, or "
                              f"--heldout-tts ''")  # fmt: skip
        for flag, name, skip in (("--tts", self.tts, ""), ("--heldout-tts", self.heldout_tts, " or --heldout-tts ''")):
            problem = name and speech_stage.missing_synthesizer(name)
            if problem:
                raise ConfigError(f"{flag} {name}: {problem}{skip}")
        if self.tts_model and self.tts != "vits":
            raise ConfigError(f"--tts-model is for --tts vits; {self.tts} takes --voices")
        if self.heldout_voice and self.heldout_voice in self.voices:
            raise ConfigError(f"--heldout-voice {self.heldout_voice} is also one of the {len(self.voices)} training "
                              f"voices (--voices); pick a voice the training speech does not use, or "
                              f"--heldout-voice ''")  # fmt: skip
        return self

    @property
    def uses_ray(self) -> bool:
        return self.workers > 1 or bool(self.ray_address)


# TeacherConfig fields the flow sets itself (paths under --data-dir; every split; every partition)
FLOW_SETS = ("samples", "out", "features", "audio", "split", "partition")


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
    if source == toy_world.SOURCE_NAME:  # the embedded default, as a JSONL source like any other
        result = toy_world.ingest_world(samples_dir)
    else:
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
        samples_dir, teacher_dir, toy_teacher.ToyTeacherConfig(), progress=False))  # fmt: skip
    print(f"toy teacher ({how}): eval exact match {report['eval_accuracy']:.1%} on {report['n_eval']} "
          f"held-out-template questions -> {teacher_dir}")
    return str(teacher_dir)


def encoder_config(tts: str, heldout_tts: str | None) -> "toy_encoder.EncoderBuildConfig":
    """The embedded encoder's build for this flow: its corpus spoken by the training speech's synthesizers (the
    encoder's default ones when that is a VITS model), its held-out synthesizer the flow's."""
    corpus_tts = tts if "vits" not in speech_stage.families_of(tts) else toy_encoder.EncoderBuildConfig.tts
    return toy_encoder.EncoderBuildConfig(tts=corpus_tts, heldout_tts=heldout_tts or "")


def check_encoder_never_heard(encoder_dir: Path, heldout_tts: str | None) -> None:
    """Refuse a held-out synthesizer that the toy encoder already built there heard in pretraining."""
    if not heldout_tts or not toy_encoder.is_built(encoder_dir):
        return
    heard = json.loads((Path(encoder_dir) / toy_encoder.BUILD_REPORT).read_text()).get("synthesizers", ["espeak-ng"])
    if heldout_tts in heard:
        raise ConfigError(f"--heldout-tts {heldout_tts}: the toy encoder at {encoder_dir} heard it in pretraining "
                          f"(its build report's synthesizers: {', '.join(heard)}); rebuild it without it (`python "
                          f"-m toy.encoder --force --tts ...`) or pick another held-out synthesizer")  # fmt: skip


@task(name="build-default-encoder")
def build_default_encoder(samples_dir: Path, encoder_dir: Path, cfg: "toy_encoder.EncoderBuildConfig") -> dict:
    """The embedded speech encoder (the toy's Whisper: phoneme CTC on pseudo-names), built once and reused."""
    report, how = build_once(toy_encoder, encoder_dir, lambda: toy_encoder.build_encoder(
        samples_dir, encoder_dir, cfg, progress=False))  # fmt: skip
    print(f"toy speech encoder ({how}): phoneme error {report['heldout_per']:.1%} on never-heard names; never heard: "
          f"{toy_encoder.never_heard_summary(report)} -> {encoder_dir}")  # fmt: skip
    return report


@task(name="synthesize-speech", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_config_error)
def synthesize_speech(samples_dir: Path, audio_dir: Path, tts: str, tts_model: str | None, voices: list[str],
                      rates: list[int], per_sample: int, split: str | None = None, speak: str = "last-user",
                      perturb_train: float = 0.0) -> dict:  # fmt: skip
    """`voices` empty: the backend's own defaults."""
    backend = speech_stage.make_backend(tts, tts_model)
    r = speech_stage.synthesize_all(samples_dir, audio_dir, backend, voices=tuple(voices) or None,
                                    rates=tuple(rates), per_sample=per_sample, progress=False, split=split,
                                    speak=speak, perturb=speech_stage.TrainPerturbation(perturb_train))  # fmt: skip
    return {"clips": r.index.num_rows, "synthesized": r.synthesized, "rejected": r.rejects.num_rows,
            "perturbed": r.perturbed}


@task(name="extract-features", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_config_error)
def extract_features(audio_dir: Path, features_dir: Path, n_mels: int) -> dict:
    r = features_stage.extract_all(audio_dir / speech_stage.INDEX_FILE, features_dir,
                                   features_stage.FeatureConfig(n_mels=n_mels), progress=False)  # fmt: skip
    return {"extracted": r.written, "already_there": r.skipped, "rejected": r.rejects.num_rows}


@task(name="cache-teacher-logits", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_config_error)
def cache_logits(cfg: TeacherConfig) -> dict:
    """Every partition in this process, one after the other (one engine)."""
    summary = cache_teacher_logits(cfg, progress=False)
    print(format_summary(summary))
    return summary


@task(name="cache-teacher-partition", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_config_error)
def cache_partition(cfg: TeacherConfig, partition: int) -> dict:
    """One partition, on a Ray worker: its own engine, its partition's lock. A retry (Prefect's after an
    error, Ray's after the worker died) continues the partition: what is cached is skipped."""
    summary = cache_teacher_logits(replace(cfg, partition=partition, overwrite=False), progress=False)
    print(f"partition {partition}: " + format_summary(summary))
    return summary


@flow(name="cache-teacher-partitions", log_prints=True)
def cache_partitions(cfg: TeacherConfig, partitions: list[int], workers: int, num_cpus: float,
                     num_gpus: float) -> list[dict]:  # fmt: skip
    """The caching task over the partitions on the flow's task runner (a RayTaskRunner), at most `workers`
    at a time, each claiming `num_cpus` / `num_gpus` of the cluster. Every partition runs to its end; then
    the first failed one's error is raised."""
    from prefect_ray.context import remote_options

    pending, running, finished = list(partitions), [], []
    with remote_options(num_cpus=num_cpus, num_gpus=num_gpus):
        while pending or running:
            while pending and len(running) < workers:
                running.append(cache_partition.submit(cfg, pending.pop(0)))
            done = next(as_completed(running))
            running.remove(done)
            finished.append(done)
    return sorted((f.result() for f in finished), key=lambda summary: summary["partitions_run"])


def ray_task_runner(flow_cfg: CacheFlowConfig, teacher_cfg: TeacherConfig):
    """A RayTaskRunner for the caching workers, and what each claims: (runner, num_cpus, num_gpus)."""
    from prefect.client.orchestration import get_client
    from prefect_ray import RayTaskRunner

    cpu = on_cpu()
    num_gpus = 0 if cpu else teacher_cfg.gpus_per_engine
    num_cpus = flow_cfg.cpus_per_worker or (max(1, (os.cpu_count() or 1) // flow_cfg.workers) if cpu else 1)
    with get_client(sync_client=True) as client:  # the workers report their task runs to this flow's API
        api_url = str(client.api_url)
    env = {"PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **VLLM_LOGGING,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    if flow_cfg.ray_address:
        init = {"address": flow_cfg.ray_address, "runtime_env": {"env_vars": env}}
    else:  # a local cluster sized to the workers; a small object store (results are summaries)
        init = {"num_cpus": max(os.cpu_count() or 1, num_cpus * flow_cfg.workers), "include_dashboard": False,
                "object_store_memory": 256 << 20, "runtime_env": {"env_vars": env}}  # fmt: skip
    return RayTaskRunner(init_kwargs=init), num_cpus, num_gpus


def cache_on_workers(flow_cfg: CacheFlowConfig, cfg: TeacherConfig) -> dict:
    """The cache's layout made (or checked) once here, then one Ray task per partition."""
    import time

    t = time.monotonic()
    if cfg.partitions is None and read_manifest(cfg.out_dir) is None:
        cfg = replace(cfg, partitions=flow_cfg.workers)  # a new cache: one partition per worker at least
    n_parts = prepare_cache(cfg)
    if n_parts < flow_cfg.workers:
        print(f"warning: the cache at {cfg.out} has {n_parts} partition(s): only {n_parts} of the {flow_cfg.workers} "
              f"workers have work (a new cache: --partitions {flow_cfg.workers} or more; an existing one keeps its "
              f"count unless rebuilt with --overwrite)")  # fmt: skip
    runner, num_cpus, num_gpus = ray_task_runner(flow_cfg, cfg)
    parts = cache_partitions.with_options(task_runner=runner)(replace(cfg, overwrite=False), list(range(n_parts)),
                                                              flow_cfg.workers, num_cpus, num_gpus)  # fmt: skip
    summary = combine_summaries(parts, cfg.out_dir, time.monotonic() - t, 0.0, parallel=True)
    (cfg.out_dir / "last_run.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return summary


def summary_markdown(samples: dict, speech: dict, feats: dict, cache: dict, heldout: dict | None = None,
                     encoder: dict | None = None, heldout_tts: dict | None = None) -> str:  # fmt: skip
    extra = ""
    for what, held in (("held-out voice", heldout), ("held-out synthesizer", heldout_tts)):
        if held:
            extra += (f"| {what} (eval split) | {held['clips']} clips, {held['extracted']} features "
                      f"extracted, {held['rejected']} rejected |\n")  # fmt: skip
    if encoder:
        extra += (f"| toy speech encoder | phoneme error {encoder['heldout_per']:.1%} on never-heard names after "
                  f"{encoder['steps']} steps ({encoder['seconds'] / 60:.1f} min); never heard: "
                  f"{toy_encoder.never_heard_summary(encoder)} |\n")  # fmt: skip
    reasons = "\n".join(f"| {reason} | {n} |" for reason, n in sorted(cache["rejects_by_reason"].items()))
    return f"""# cache-teacher run

| stage | result |
|---|---|
| samples | {samples['accepted']} accepted, {samples['rejected']} rejected |
| speech | {speech['clips']} clips ({speech['synthesized']} new, {speech.get('perturbed', 0)} perturbed), {speech['rejected']} rejected |
| features | {feats['extracted']} extracted, {feats['already_there']} already there, {feats['rejected']} rejected |
| teacher cache | {cache['cached_now']} cached now ({cache.get('rescored_changed', 0)} re-scored: changed since cached), {cache['already_cached']} already there, {cache['rejected']} rejected |
| response tokens cached | {cache['tokens_cached']} |
| tokens/s (scored, engine start excluded) | {cache['tokens_per_second']} |
| prompt tokens taken from vLLM's prefix cache | {cache.get('prompt_tokens_from_prefix_cache', 0)} of {cache['tokens_scored']} scored |
| bytes per cached token | {cache['bytes_per_cached_token']} |
| seconds per phase (summed over workers; encode and write overlap scoring) | {format_phases(cache.get('phase_seconds')).removeprefix('; seconds: ') or '-'} |
| cache | `{cache['cache_dir']}` ({cache['cache_rows']} rows, {cache['cache_bytes']} bytes, {cache.get('targets') or 'top-' + str(cache['top_k'])}) |
{extra}
Cache rejects by reason:

| reason | count |
|---|---|
{reasons or '| (none) | 0 |'}
"""


def split_parameters(params: dict) -> tuple[CacheFlowConfig, TeacherConfig]:
    """The flow's parameters as its two configs, validated; the teacher's paths are under data_dir."""
    own = {f.name for f in fields(CacheFlowConfig)}
    flow_cfg = CacheFlowConfig(**{k: v for k, v in params.items() if k in own}).validate()  # and once resolved
    if flow_cfg.heldout_voice == "auto":
        flow_cfg.heldout_voice = speech_stage.heldout_voice_of(flow_cfg.tts, flow_cfg.tts_model)
    flow_cfg.heldout_voice = flow_cfg.heldout_voice or None
    if flow_cfg.heldout_tts == "auto":
        used = speech_stage.families_of(flow_cfg.tts)
        flow_cfg.heldout_tts = next((t for t in ("flite", "festival", "espeak-ng") if t not in used), "")
    data = Path(flow_cfg.data_dir)
    teacher_cfg = TeacherConfig(**{k: v for k, v in params.items() if k not in own}, samples=str(data / "samples"),
                                out=str(data / "cache"), features=str(data / "features"),
                                audio=str(data / "audio"))  # fmt: skip
    return flow_cfg.validate(), check_platform(teacher_cfg.validate(require_teacher=teacher_cfg.teacher is not None))


def run_cache_teacher(**params) -> dict:
    """Cache the teacher's top-k logprobs over every sample's response, with its speech features.

    Parameters: the fields of CacheFlowConfig and TeacherConfig (see `python flows/cache_teacher.py --help`).
    `teacher` None: the embedded toy teacher, trained on the samples if `<data_dir>/models/teacher` is missing.
    """
    flow_cfg, cfg = split_parameters(params)
    data = Path(flow_cfg.data_dir)
    samples_dir, audio_dir, features_dir = data / "samples", data / "audio", data / "features"
    toy = cfg.teacher is None
    if toy:
        cfg = replace(cfg, teacher=str(data / "models" / "teacher"))
    builds_encoder = flow_cfg.default_encoder and flow_cfg.source == toy_world.SOURCE_NAME
    if builds_encoder:  # before any work: a held-out synthesizer the encoder heard is refused at once
        check_encoder_never_heard(data / "models" / "encoder", flow_cfg.heldout_tts)
    samples = prepare_samples(flow_cfg.source, samples_dir, flow_cfg.split)
    if toy:
        build_default_teacher(samples_dir, data / "models" / "teacher")
    speech = synthesize_speech(samples_dir, audio_dir, flow_cfg.tts, flow_cfg.tts_model, flow_cfg.voices,
                               flow_cfg.rates, flow_cfg.per_sample, speak=flow_cfg.speak,
                               perturb_train=flow_cfg.perturb_train)  # fmt: skip
    feats = extract_features(audio_dir, features_dir, flow_cfg.n_mels)
    heldout = None
    if flow_cfg.heldout_voice:
        held_audio = data / ("audio" + schemas.HELDOUT_VOICE_SUFFIX)
        held_features = data / ("features" + schemas.HELDOUT_VOICE_SUFFIX)
        held_speech = synthesize_speech(samples_dir, held_audio, flow_cfg.tts, flow_cfg.tts_model,
                                        [flow_cfg.heldout_voice], [HELDOUT_RATE], 1, split="eval")  # fmt: skip
        heldout = {**held_speech, **extract_features(held_audio, held_features, flow_cfg.n_mels)}
    heldout_tts = None
    if flow_cfg.heldout_tts:
        tts_audio = data / ("audio" + schemas.HELDOUT_TTS_SUFFIX)
        tts_features = data / ("features" + schemas.HELDOUT_TTS_SUFFIX)
        tts_speech = synthesize_speech(samples_dir, tts_audio, flow_cfg.heldout_tts, None, [], [HELDOUT_RATE], 1,
                                       split="eval")  # fmt: skip
        heldout_tts = {**tts_speech, **extract_features(tts_audio, tts_features, flow_cfg.n_mels)}
    cache = cache_on_workers(flow_cfg, cfg) if flow_cfg.uses_ray else cache_logits(cfg)
    encoder = None
    if builds_encoder:
        encoder = build_default_encoder(samples_dir, data / "models" / "encoder",
                                        encoder_config(flow_cfg.tts, flow_cfg.heldout_tts))  # fmt: skip
    create_markdown_artifact(
        key="cache-teacher-summary",
        markdown=summary_markdown(samples, speech, feats, cache, heldout, encoder, heldout_tts),
        description="speechkd cache-teacher run summary",
    )  # fmt: skip
    return {"samples": samples, "speech": speech, "features": feats, "cache": cache, "heldout_voice": heldout,
            "heldout_tts": heldout_tts, "encoder": encoder}  # fmt: skip


# The flow's signature is the two configs' fields: Prefect builds the parameter schema (and a deployment's
# defaults) from it, and validates a run's parameters against it.
run_cache_teacher.__signature__ = inspect.Signature(
    flow_parameters(CacheFlowConfig) + flow_parameters(TeacherConfig, skip=FLOW_SETS), return_annotation=dict
)
cache_teacher = flow(name=FLOW_NAME, log_prints=True)(run_cache_teacher)


def parse_command_line(argv: list[str] | None = None):
    """The flow's flags: CacheFlowConfig's, TeacherConfig's (but those the flow sets itself), --serve, --config."""
    def serve(parser):
        parser.add_argument("--serve", metavar="DEPLOYMENT", help="serve the flow as this deployment instead of "
                                                                  "running it")  # fmt: skip

    return parse_args(CacheFlowConfig, (TeacherConfig, FLOW_SETS), argv=argv, description=__doc__,
                      add_arguments=serve)  # fmt: skip


@cli("cache_teacher.py")
def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(argv)
    params = {k: v for k, v in vars(args).items() if k not in ("serve", "config")}
    split_parameters(params)  # a bad option fails here, in a second, before Prefect starts
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

"""Session-wide fixtures: a small toy world, a tiny teacher, one shared vLLM engine.

Any test that uses an engine- or server-backed fixture (ENGINE_FIXTURES, directly or through another fixture) is
marked `slow` here, so `pytest -m "not slow"` (make test-fast) starts no vLLM engine; tests that start an engine,
a Prefect server or a Ray cluster themselves carry the mark in their module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from pipeline.samples import ingest  # noqa: E402
from tests.helpers import TINY_TEACHER, TINY_WORLD, chat_rows, tiny_teacher_config  # noqa: E402
from toy.teacher import build_teacher  # noqa: E402
from toy.world import generate  # noqa: E402

# fixtures that start a vLLM engine (or need one): a test using any of them, even through another fixture, is slow
ENGINE_FIXTURES = {"vllm_engine"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_rows() -> list[dict]:
    return generate(TINY_WORLD)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def samples_dir(data_root, tiny_rows) -> Path:
    import json

    src = data_root / "raw" / "tiny.jsonl"
    src.parent.mkdir(parents=True)
    src.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows))
    out = data_root / "samples"
    ingest(str(src), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(data_root, samples_dir) -> Path:
    out = data_root / "models" / "teacher"
    build_teacher(samples_dir, out, TINY_TEACHER, progress=False)
    return out


@pytest.fixture(scope="session")
def vllm_engine(tiny_teacher):
    """One CPU vLLM engine for the whole session (engine start is ~25 s)."""
    from pipeline.engine import make_engine

    llm = make_engine(tiny_teacher_config(tiny_teacher), top_k=64)
    yield llm
    del llm


@pytest.fixture(scope="session")
def tiny_whisper(data_root) -> Path:
    """A randomly initialised two-layer Whisper saved locally: the --encoder path without a download."""
    from transformers import WhisperConfig, WhisperModel

    cfg = WhisperConfig(num_mel_bins=40, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                        max_source_positions=1500, max_target_positions=32)  # fmt: skip
    out = data_root / "models" / "whisper-tiny-random"
    WhisperModel(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def student_cache(samples_dir, tiny_teacher, vllm_engine, tmp_path_factory):
    """A real cache + real speech features for the tiny toy world."""
    from pipeline.features import FeatureConfig, extract_all
    from pipeline.speech import synthesize_all
    from pipeline.teacher import cache_teacher_logits

    root = tmp_path_factory.mktemp("student")
    synthesize_all(samples_dir, root / "audio", voices=("en-us",), rates=(170,), progress=False)
    extract_all(root / "audio" / "index.parquet", root / "features", FeatureConfig(n_mels=40), progress=False)
    cfg = tiny_teacher_config(tiny_teacher, samples=samples_dir, out=root / "cache", features=root / "features",
                              audio=root / "audio", top_k=8)  # fmt: skip
    cache_teacher_logits(cfg, progress=False, llm=vllm_engine)
    return root / "cache"


@pytest.fixture(scope="session")
def tiny_vits(data_root) -> Path:
    """A randomly initialised VITS (transformers' VitsModel) with 4 speakers at 22.05 kHz and a phonemizing
    tokenizer, as kakao-enterprise/vits-vctk has: the --backend vits path without a download. Its durations are
    fixed at 2 frames (512 samples) a token at speaking rate 1, so lengths are known; it says nothing."""
    import json

    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    out = data_root / "models" / "vits-tiny-random"
    out.mkdir(parents=True)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz ,.?!'-ɐɑɒæçðŋøœɔɕɖɗɘəɚɛɜɝɞɟɡɣɤɥɦɨɪɫɬɭɯɰɱɲɳɴɵɸɹɺɻɽɾʁʂʃʈʉʊʋʌʍʎʏʐʑʒʔʕʝʟʤʧˈˌːˑθχᵻ"))
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(chars)}, "<unk>": len(chars) + 1}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    VitsTokenizer(out / "vocab.json", phonemize=True, normalize=True, add_blank=True).save_pretrained(out)
    cfg = VitsConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                     flow_size=16, spectrogram_bins=33, upsample_initial_channel=32, upsample_rates=[8, 8, 4],
                     upsample_kernel_sizes=[16, 16, 8], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
                     num_speakers=4, speaker_embedding_size=8, use_stochastic_duration_prediction=False,
                     duration_predictor_filter_channels=16, prior_encoder_num_flows=2,
                     prior_encoder_num_wavenet_layers=2, posterior_encoder_num_wavenet_layers=2,
                     sampling_rate=22050)  # fmt: skip
    torch.manual_seed(0)
    model = VitsModel(cfg).eval()
    with torch.no_grad():  # log duration = log 2 for every token
        model.duration_predictor.proj.weight.zero_()
        model.duration_predictor.proj.bias.fill_(float(torch.log(torch.tensor(2.0))))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chat_samples(tiny_rows, tmp_path_factory) -> Path:
    """Eight conversations of the tiny world (a system prompt, two question-answer rounds), ingested."""
    import json

    root = tmp_path_factory.mktemp("chat")
    src = root / "chats.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(tiny_rows)))
    ingest(str(src), root / "samples", progress=False)
    return root / "samples"


@pytest.fixture(scope="session")
def chat_cache(chat_samples, tiny_teacher, vllm_engine) -> Path:
    """The conversations cached with --turns all, every user turn spoken (audio and speech features beside)."""
    from pipeline.features import FeatureConfig, extract_all
    from pipeline.speech import synthesize_all
    from pipeline.teacher import cache_teacher_logits

    root = chat_samples.parent
    synthesize_all(chat_samples, root / "audio", voices=("en-us",), rates=(170,), progress=False, speak="all-user")
    extract_all(root / "audio" / "index.parquet", root / "features", FeatureConfig(n_mels=40), progress=False)
    cfg = tiny_teacher_config(tiny_teacher, samples=chat_samples, out=root / "cache", features=root / "features",
                              audio=root / "audio", top_k=8, turns="all")  # fmt: skip
    cache_teacher_logits(cfg, progress=False, llm=vllm_engine)
    return root / "cache"

"""Tiny random speech LLMs of the real classes, built locally: the `--student` path without a download.

    python -m toy.speech_llm --kind qwen2-audio --out data/models/qwen2-audio-tiny     # after make demo
    python -m toy.speech_llm --kind qwen2.5-omni --out data/models/omni-thinker-tiny
    python student/train.py --logits data/cache --student data/models/qwen2-audio-tiny --lora-rank 8

A `Qwen2AudioForConditionalGeneration` or a `Qwen2_5OmniThinkerForConditionalGeneration` built from a config with
random weights, saved with its real processor (`Qwen2AudioProcessor` / `Qwen2_5OmniProcessor`: Whisper's feature
extractor at 128 mel bins, the model's audio placeholder tokens). Its tokenizer is the toy teacher's plus the
model's audio (and, for the Omni thinker, vision) special tokens at new ids, as Qwen2.5-Omni's is Qwen2.5's plus
its own: every id the toy cache holds means the same token to it. Its chat template renders content parts (text,
or an audio part the processor expands), with the teacher's turn markers. It knows nothing (random weights): it
exercises the code path a 7B student takes, at a size a CPU trains in seconds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import schemas
from pipeline.config import opt, parse_config
from pipeline.errors import cli

KINDS = ("qwen2-audio", "qwen2.5-omni")
AUDIO_TOKENS = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
VISION_TOKENS = {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
                 "vision_eos_token": "<|vision_eos|>"}  # fmt: skip
# the toy teacher's turn markers around content parts: an audio part is the model's placeholder between its markers
CHAT_TEMPLATE = (
    "{%- for message in messages %}<|{{ message['role'] }}|>"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>{%- else %}{{ part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}<|end|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)


@dataclass
class SpeechLLMBuild:
    kind: str = opt("qwen2-audio", "which class: qwen2-audio (Qwen2AudioForConditionalGeneration) or qwen2.5-omni "
                                   "(Qwen2_5OmniThinkerForConditionalGeneration)", KINDS)  # fmt: skip
    teacher: str = opt(str(schemas.TEACHER_DIR), "the tokenizer to extend (the toy teacher's, or any HF tokenizer)")
    out: str = opt(str(schemas.MODELS_DIR / "qwen2-audio-tiny"), "where to save the model and its processor")
    hidden_size: int = opt(64, "the LM's width")
    layers: int = opt(2, "the LM's layers")
    intermediate_size: int | None = opt(None, "the LM's MLP width (default: 2 x hidden)")
    heads: int | None = opt(None, "the LM's attention heads (default: hidden / 32)")
    kv_heads: int = opt(1, "the LM's key/value heads")
    dtype: str = opt("float32", "the saved weights' dtype", ("float32", "bfloat16"))
    init_device: str = opt("cpu", "where the random weights are made (cuda: a large model in seconds)")
    audio_dim: int = opt(32, "the audio tower's width")
    audio_layers: int = opt(1, "the audio tower's layers")
    seed: int = opt(0, "seeds the random weights")


def extended_tokenizer(teacher: str, kind: str):
    """The teacher's tokenizer plus the model's special tokens at new ids (the teacher's ids all stay)."""
    from transformers import AutoTokenizer

    names = {**AUDIO_TOKENS, **(VISION_TOKENS if kind == "qwen2.5-omni" else {})}
    tok = AutoTokenizer.from_pretrained(teacher, extra_special_tokens=names)
    missing = [t for t in names.values() if t not in tok.get_vocab()]
    if missing:  # extra_special_tokens names them; the vocabulary needs them too
        tok.add_special_tokens({"additional_special_tokens": missing})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build(cfg: SpeechLLMBuild) -> Path:
    """Build and save the tiny model with its processor; returns its directory."""
    from transformers import WhisperFeatureExtractor

    torch.manual_seed(cfg.seed)
    tok = extended_tokenizer(cfg.teacher, cfg.kind)
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in {**AUDIO_TOKENS, **VISION_TOKENS}.items()
           if token in tok.get_vocab()}  # fmt: skip
    extractor = WhisperFeatureExtractor(feature_size=128)
    heads = cfg.heads or max(1, cfg.hidden_size // 32)
    text = dict(vocab_size=len(tok), hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size or 2 * cfg.hidden_size, num_hidden_layers=cfg.layers,
                num_attention_heads=heads, num_key_value_heads=cfg.kv_heads,
                max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)  # fmt: skip
    audio = dict(num_mel_bins=128, encoder_layers=cfg.audio_layers, encoder_attention_heads=2,
                 encoder_ffn_dim=2 * cfg.audio_dim, d_model=cfg.audio_dim)  # fmt: skip
    if cfg.kind == "qwen2-audio":
        from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

        config = Qwen2AudioConfig(audio_config={"model_type": "qwen2_audio_encoder", "max_source_positions": 1500,
                                                **audio},
                                  text_config={"model_type": "qwen2", **text}, audio_token_index=ids["audio_token"])  # fmt: skip
        with torch.device(cfg.init_device):
            model = Qwen2AudioForConditionalGeneration(config).to(getattr(torch, cfg.dtype))
        processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    else:
        from transformers import (Qwen2_5OmniProcessor, Qwen2_5OmniThinkerConfig,
                                  Qwen2_5OmniThinkerForConditionalGeneration)
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        head_dim = cfg.hidden_size // heads
        mrope = [head_dim // 8, (head_dim // 2 - head_dim // 8) // 2]
        mrope.append(head_dim // 2 - sum(mrope))
        config = Qwen2_5OmniThinkerConfig(
            audio_config={**audio, "output_dim": cfg.hidden_size, "n_window": 50},
            vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                           "out_hidden_size": cfg.hidden_size, "fullatt_block_indexes": [0]},
            text_config={**text, "rope_scaling": {"type": "default", "mrope_section": mrope}},
            audio_token_index=ids["audio_token"], image_token_index=ids["image_token"],
            video_token_index=ids["video_token"], audio_start_token_id=ids["audio_bos_token"],
            audio_end_token_id=ids["audio_eos_token"], vision_start_token_id=ids["vision_bos_token"],
            vision_end_token_id=ids["vision_eos_token"])  # fmt: skip
        with torch.device(cfg.init_device):
            model = Qwen2_5OmniThinkerForConditionalGeneration(config).to(getattr(torch, cfg.dtype))
        processor = Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                                         feature_extractor=extractor, tokenizer=tok, chat_template=CHAT_TEMPLATE)  # fmt: skip
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    out = Path(cfg.out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@cli("toy.speech_llm")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SpeechLLMBuild, argv, description=__doc__)
    out = build(cfg)
    print(f"tiny {cfg.kind} speech LLM (random weights, the teacher's tokenizer + its audio tokens) -> {out}")


if __name__ == "__main__":
    sys.exit(main())

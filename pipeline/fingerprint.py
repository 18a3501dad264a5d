"""What produced an artifact: hashes of teacher weights, tokenizer and chat template.

A cache records the fingerprint of its teacher; appending to it with another
teacher, tokenizer, template, k or encoding is refused, and the student refuses
a cache whose tokenizer differs from its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def local_model_dir(model: str) -> Path:
    """The local directory of a model path or a Hugging Face id (from the HF cache)."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model))


def weights_sha256(model_dir: Path) -> str:
    """One hash over every weight file (name + content) of a model directory."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {model_dir}")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(_sha256_file(p).encode())
    return h.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """Hash of what maps text to ids: the vocabulary, merges/model and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Padding/truncation settings do not change ids; the model and specials do.
        payload = {k: state.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor")}
    else:
        payload = {"vocab": sorted(tokenizer.get_vocab().items())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def chat_template_sha256(tokenizer) -> str:
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest()


def diff(expected: dict, found: dict, keys: list[str]) -> list[str]:
    """Human-readable list of the fields that differ."""
    return [f"{k}: cache has {found.get(k)!r}, this run has {expected.get(k)!r}" for k in keys if expected.get(k) != found.get(k)]

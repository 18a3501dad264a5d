"""What produced an artifact: hashes of teacher weights, tokenizer and chat template.

A cache records the fingerprint of its teacher; appending to it with another
teacher, tokenizer, template, k or encoding is refused, and the student refuses
a cache whose tokenizer differs from its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline.chat import conversation, to_score
from pipeline.files import sha256_file, write_json_atomic

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _hash_memo_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "speechkd" / "file-sha256.json"


def _sha256_file_memo(path: Path) -> str:
    """sha256_file, remembered across runs by (absolute path, inode, size, mtime, ctime): a big teacher is
    hashed once, not on every caching run. A changed file is hashed again: a rewrite that restores the
    mtime (touch -d, rsync -t, cp -p) still moves ctime, which no user call can set back."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    memo_path = _hash_memo_path()
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = sha256_file(path)
    memo[key] = digest
    try:
        write_json_atomic(memo_path, memo, indent=None)
    except OSError:
        pass  # a read-only home only costs the re-hash next time
    return digest


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
        h.update(_sha256_file_memo(p).encode())
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


def content_sha256(sample: dict, generation: dict | None = None) -> str:
    """What a cache row scored, the one rule every writer and reader of a cache uses: the sample's prompt and its
    response (dataset responses), or its prompt and the generation settings (teacher-written responses: the
    teacher writes the response from those, and the sample's own response is not used); a conversation's turns
    in place of the prompt and response (without its final assistant turn when the teacher writes that). A sample
    whose hash differs from its cache row's has changed since it was cached."""
    messages = sample.get("messages") or ""
    if messages:
        turns = to_score(conversation(sample), "dataset" if generation is None else "teacher")
        payload = {"messages": turns} if generation is None else {"messages": turns, "generation": generation}
    else:
        payload = ({"prompt": sample["prompt"], "response": sample["response"]} if generation is None
                   else {"prompt": sample["prompt"], "generation": generation})  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]

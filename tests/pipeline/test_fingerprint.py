"""Teacher weight hashes are remembered across runs, and a changed weight file is hashed again."""

import hashlib
import os

from pipeline.fingerprint import weights_sha256


def _expected(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(hashlib.sha256(files[name]).hexdigest().encode())
    return h.hexdigest()


def test_weight_hash_is_memoized_and_follows_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = tmp_path / "model"
    model.mkdir()
    files = {"model.safetensors": b"a" * 1000, "extra.bin": b"b" * 10}
    for name, data in files.items():
        (model / name).write_bytes(data)
    (model / "config.json").write_text("{}")  # not a weight file
    assert weights_sha256(model) == _expected(files)
    assert (tmp_path / "xdg" / "speechkd" / "file-sha256.json").exists()
    assert weights_sha256(model) == _expected(files)  # from the memo
    # same size, new content and mtime: hashed again, not served stale
    files["model.safetensors"] = b"c" * 1000
    (model / "model.safetensors").write_bytes(files["model.safetensors"])
    st = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert weights_sha256(model) == _expected(files)

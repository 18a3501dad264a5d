import json

import pyarrow.parquet as pq
import pytest

from pipeline import schemas
from pipeline.parquet_io import rejects_path
from pipeline.samples import FieldMap, content_id, ingest, load_samples, main


def _write_jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(r if isinstance(r, str) else json.dumps(r))
            fh.write("\n")


def test_jsonl_with_bad_rows_keeps_good_and_records_each_bad(tmp_path):
    src = tmp_path / "in.jsonl"
    _write_jsonl(
        src,
        [
            {"id": "a", "question": "What is one?", "answer": "One.", "lang": "en"},  # 0 ok
            {"id": "b", "question": "", "answer": "x"},  # 1 empty prompt
            {"id": "c", "answer": "no prompt"},  # 2 missing prompt
            {"id": "d", "question": 42, "answer": "x"},  # 3 non-string prompt
            {"id": "a", "question": "Again?", "answer": "dup"},  # 4 duplicate id
            "{broken json",  # 5 invalid line
            {"id": "f", "question": "Q" * 50, "answer": "x"},  # 6 too long
            {"id": "g", "question": "Answer?", "answer": ["list"]},  # 7 non-string response
            {"question": "No id here?", "answer": "Hashed."},  # 8 ok, hashed id
            {"id": "h", "question": "Empty answer is fine?"},  # 9 ok, response ""
        ],
    )
    out = tmp_path / "samples"
    result = ingest(
        str(src), out, FieldMap(prompt="question", response="answer", sample_id="id", split=None, meta=None),
        default_split="eval", max_chars=40, progress=False,
    )  # fmt: skip
    samples = load_samples(out)
    assert samples["sample_id"].to_pylist() == ["a", content_id("No id here?", "Hashed."), "h"]
    assert samples["split"].to_pylist() == ["eval"] * 3
    assert json.loads(samples["meta"][0].as_py()) == {"lang": "en"}
    assert samples["response"][2].as_py() == ""

    rejects = pq.read_table(rejects_path(out, "samples")).to_pylist()
    assert result.rejects.num_rows == len(rejects) == 7
    by_pos = {r["source_position"]: r for r in rejects}  # JSONL: the line number, 1-based
    assert set(by_pos) == {2, 3, 4, 5, 6, 7, 8}
    assert by_pos[2]["field"] == "prompt" and by_pos[2]["reason"] == "empty"
    assert by_pos[3]["field"] == "prompt" and "missing" in by_pos[3]["reason"]
    assert by_pos[4]["field"] == "prompt" and "got int" in by_pos[4]["reason"]
    assert by_pos[5]["field"] == "sample_id" and "first seen at source position 1" in by_pos[5]["reason"]
    assert by_pos[6]["field"] == "row" and "invalid JSON" in by_pos[6]["reason"]
    assert by_pos[7]["field"] == "prompt" and "too long" in by_pos[7]["reason"]
    assert by_pos[8]["field"] == "response" and "got list" in by_pos[8]["reason"]
    assert all(r["stage"] == "samples" for r in rejects)
    assert by_pos[4]["sample_id"] == "d"  # the reject names the sample


def test_content_id_is_stable_and_content_sensitive():
    assert content_id("p", "r") == content_id("p", "r")
    assert content_id("p", "r") != content_id("p", "r2")


def test_parquet_and_hf_dataset_sources(tmp_path):
    import datasets
    import pyarrow as pa

    rows = {"prompt": ["a?", "b?"], "response": ["A.", "B."], "split": ["train", "eval"]}
    pq.write_table(pa.table(rows), tmp_path / "src.parquet")
    ingest(str(tmp_path / "src.parquet"), tmp_path / "from_parquet", progress=False)
    assert load_samples(tmp_path / "from_parquet")["prompt"].to_pylist() == ["a?", "b?"]

    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    ingest(str(tmp_path / "hf"), tmp_path / "from_hf", progress=False)
    t = load_samples(tmp_path / "from_hf")
    assert t["split"].to_pylist() == ["train", "eval"]
    assert t.schema.metadata[schemas.ARTIFACT_KEY] == b"samples"


def test_load_refuses_other_artifacts(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"x": [1]}), tmp_path / "samples.parquet")
    with pytest.raises(ValueError, match="expected a speechkd 'samples' file"):
        load_samples(tmp_path)


def test_cli_prints_counts(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, [{"prompt": "ok?"}, {"prompt": ""}])
    main(["--source", str(src), "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "1 accepted" in out and "1 rejected" in out


# --- issue 9 (6): ingest errors are rejects or one-line errors, never a lost table ---------------------


def _cli(args, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "pipeline.samples", *args], cwd=repo, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_invalid_utf8_line_and_bom_are_handled_per_line(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [b'\xef\xbb\xbf{"prompt": "first?", "response": "A."}', b"", b'{"prompt": "bad \xff\xfe byte?"}',
             b'{"prompt": "third?", "response": "C."}']  # fmt: skip
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "samples"
    result = ingest(str(src), out, progress=False)
    assert load_samples(out)["prompt"].to_pylist() == ["first?", "third?"]  # the BOM costs nothing
    rejects = result.rejects.to_pylist()
    assert len(rejects) == 1 and rejects[0]["source_position"] == 3  # the source line, blank line counted
    assert "not valid UTF-8" in rejects[0]["reason"]


def test_an_empty_source_keeps_the_previous_samples_and_fails_with_one_line(tmp_path):
    out = tmp_path / "samples"
    good = tmp_path / "good.jsonl"
    _write_jsonl(good, [{"prompt": "kept?", "response": "Yes."}])
    ingest(str(good), out, progress=False)
    before = (out / "samples.parquet").read_bytes()
    for content in ("", "\n\n", '{"prompt": ""}\n'):
        empty = tmp_path / "empty.jsonl"
        empty.write_text(content)
        r = _cli(["--source", str(empty), "--out", str(out)], tmp_path)
        assert r.returncode == 2 and "no usable sample" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert (out / "samples.parquet").read_bytes() == before


def test_bad_source_paths_are_one_line_errors(tmp_path):
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    (plain_dir / "notes.txt").write_text("hello")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all")
    cases = [(str(tmp_path / "nope.jsonl"), 3, "no such file"), (str(plain_dir), 4, "not a dataset saved"),
             (str(garbage), 4, "not a readable Parquet file"), (str(tmp_path / "x.txt"), 3, "no such file")]  # fmt: skip
    for source, code, needle in cases:
        r = _cli(["--source", source, "--out", str(tmp_path / "s")], tmp_path)
        assert r.returncode == code, (source, r.returncode, r.stderr[-1500:])
        assert needle in r.stderr and "Traceback" not in r.stderr, (source, r.stderr[-1500:])
        assert len(r.stderr.strip().splitlines()) == 1

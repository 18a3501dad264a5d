"""Samples: the one record every later stage keys on.

    python -m pipeline.samples                          # the embedded toy world (python -m toy.world writes it)
    python -m pipeline.samples --source my.jsonl --prompt-field question --response-field answer
    python -m pipeline.samples --source some/hf-dataset --hf-split test --split eval
    python -m pipeline.samples --source chats.jsonl                   # rows with a `messages` list: conversations
    python -m pipeline.samples --source Open-Orca/OpenOrca --prompt-field question   # + its system_prompt column

A sample is (sample_id, prompt, response, split, meta, messages). A plain one is
a prompt and its response; a conversation is its `messages`, a list of
{role, content} turns (system first if any, then user and assistant in turn;
ShareGPT's {from, value} with human/gpt read too), from a messages column, or
a plain row with a non-empty system prompt column (Open-Orca). A conversation's
`prompt` is its last user turn and its `response` its final assistant turn ("" when
it ends with the user: the teacher writes the answer). `sample_id` is kept when
the source has one, else it is a stable hash of the content. Rows that cannot be
used are never dropped silently: each goes to rejects.parquet with its position
in the source, the field at fault (e.g. messages[2].role) and the reason
(data/rejects/samples.parquet).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import schemas
from pipeline.chat import ROLES
from pipeline.config import opt, parse_config
from pipeline.errors import InputMismatch, MissingInput, UserError, cli
from pipeline.parquet_io import reject, rejects_path, rejects_table, write_table_atomic

SAMPLES_FILE = "samples.parquet"
# The embedded default corpus, as any source: a JSONL file (`python -m toy.world` writes it; the flow does too).
TOY_WORLD_JSONL = schemas.DATA_DIR / "raw" / "toy_world.jsonl"


@dataclass
class SamplesConfig:
    """`python -m pipeline.samples`: where the rows come from and which column feeds which field."""

    source: str = opt(str(TOY_WORLD_JSONL), "a .jsonl or .parquet file, a dataset saved with save_to_disk, or a "
                                            "Hugging Face dataset name (default: the embedded toy world)")  # fmt: skip
    out: str = opt(str(schemas.SAMPLES_DIR), "output directory")
    prompt_field: str = opt("prompt", "source column holding the prompt")
    response_field: str = opt("response", "source column holding the response")
    id_field: str = opt("sample_id", "source column holding the id (else a hash of the content)")
    split_field: str = opt("split", "source column holding the split")
    meta_field: str = opt("meta", "source column holding a dict of metadata")
    messages_field: str = opt("messages", "source column holding a conversation: a list of {role, content} turns "
                                          "(roles system, user, assistant; or ShareGPT's {from, value})")  # fmt: skip
    system_field: str = opt("system_prompt", "source column holding a system prompt (Open-Orca): a row with a "
                                             "non-empty one is a conversation (system, user, assistant)")  # fmt: skip
    split: str = opt("train", "split of rows whose source has no split column")
    hf_split: str = opt("train", "which split of a Hugging Face dataset to read")
    max_chars: int = opt(8000, "longer prompts/responses are rejected")

    @property
    def fields(self) -> "FieldMap":
        return FieldMap(self.prompt_field, self.response_field, self.id_field, self.split_field, self.meta_field,
                        self.messages_field or None, self.system_field or None)  # fmt: skip


@dataclass(frozen=True)
class FieldMap:
    """Which source column feeds which sample field (None: not in the source)."""

    prompt: str = "prompt"
    response: str | None = "response"
    sample_id: str | None = "sample_id"
    split: str | None = "split"
    meta: str | None = "meta"
    messages: str | None = "messages"
    system: str | None = "system_prompt"


@dataclass
class IngestResult:
    samples: pa.Table
    rejects: pa.Table


def _text_problem(field: str, value, max_chars: int, allow_empty: bool) -> tuple[str, str] | None:
    """(field, reason) when `value` cannot be this text field, else None."""
    if not isinstance(value, str):
        return field, f"must be a string, got {_type_name(value)}"
    if not allow_empty and not value.strip():
        return field, "empty"
    if len(value) > max_chars:
        return field, f"too long: {len(value)} characters > --max-chars {max_chars}"
    return None


def content_id(prompt: str, response: str, messages: str = "") -> str:
    """Stable id for a sample whose source gives none: a hash of its content."""
    digest = hashlib.sha256(json.dumps([prompt, response] + ([messages] if messages else [])).encode()).hexdigest()
    return f"h{digest[:20]}"


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}  # fmt: skip


def read_conversation(value, max_chars: int) -> tuple[list[dict] | None, tuple[str, str] | None]:
    """(turns, None) for a usable conversation, else (None, (field, reason)) naming the turn at fault: a list
    (or its JSON text) of {role, content} (or ShareGPT {from, value}) turns, an optional system turn first, then
    user and assistant turns in turn, starting with the user; every content a non-empty string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            return None, ("messages", f"not a JSON list of turns ({exc.msg})")
    if not isinstance(value, (list, tuple)):
        return None, ("messages", f"must be a list of {{role, content}} turns, got {_type_name(value)}")
    if not value:
        return None, ("messages", "empty: no turns")
    turns: list[dict] = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            return None, (where, f"must be an object {{role, content}}, got {_type_name(m)}")
        sharegpt = "role" not in m and "from" in m
        role, content = (m.get("from"), m.get("value")) if sharegpt else (m.get("role"), m.get("content"))
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        role = SHAREGPT_ROLES.get(role, role) if sharegpt else role
        if role not in ROLES:
            return None, (f"{where}.{role_key}", f"must be one of {', '.join(ROLES)}, got {role!r}")
        expected = ("system", "user") if i == 0 else ("user",) if turns[-1]["role"] != "user" else ("assistant",)
        if role not in expected:
            return None, (f"{where}.{role_key}", (f"a {role} turn here is out of order: expected "
                                                  f"{' or '.join(expected)} (an optional system turn first, then "
                                                  f"user and assistant turns in turn)"))  # fmt: skip
        problem = _text_problem(f"{where}.{content_key}", content, max_chars, allow_empty=False)
        if problem:
            return None, problem
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "user" for t in turns):
        return None, ("messages", "has no user turn")
    return turns, None


def as_sample_text(turns: list[dict]) -> tuple[str, str, str]:
    """(prompt, response, messages) of a conversation: a single user turn with at most its answer is a plain
    sample (messages ""), so the two forms of the same exchange are the same sample."""
    users = [t["content"] for t in turns if t["role"] == "user"]
    response = turns[-1]["content"] if turns[-1]["role"] == "assistant" else ""
    plain = [t["role"] for t in turns] in (["user"], ["user", "assistant"])
    return users[-1], response, "" if plain else json.dumps(turns, ensure_ascii=False)


def _type_name(value: Any) -> str:
    return type(value).__name__


class EmptySource(UserError):
    """A source that gave no usable sample: the existing samples are kept."""


def validate(
    rows: Iterable[dict | tuple[int, dict]],
    fields: FieldMap = FieldMap(),
    default_split: str = "train",
    max_chars: int = 8000,
    progress: bool = False,
) -> IngestResult:
    """Turn source rows into samples; every unusable row becomes a reject.

    `rows`: dicts (their position is their index) or (position, dict) pairs, the position being what the
    reject records: the line number for JSONL (1-based, blank lines counted), the row index otherwise.
    """
    accepted: dict[str, list] = {f.name: [] for f in schemas.SAMPLES_SCHEMA}
    rejected: list[dict] = []
    first_seen: dict[str, int] = {}
    mapped = {fields.prompt, fields.response, fields.sample_id, fields.split, fields.meta, fields.messages,
              fields.system}  # fmt: skip
    if not fields.prompt:
        raise ValueError("a prompt field is required (--prompt-field)")

    for index, item in enumerate(tqdm(rows, desc="samples", unit="row", disable=not progress)):
        pos, row = item if isinstance(item, tuple) else (index, item)
        rid = row.get(fields.sample_id) if fields.sample_id else None
        rid_text = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None

        def bad(field: str, reason: str) -> None:
            rejected.append(reject("samples", field, reason, sample_id=rid_text, source_position=pos))

        if "__invalid__" in row:
            bad("row", row["__invalid__"])
            continue
        messages = ""
        if fields.messages and row.get(fields.messages) not in (None, ""):  # "": a plain sample (a samples file)
            turns, problem = read_conversation(row[fields.messages], max_chars)
            if problem:
                bad(*problem)
                continue
            prompt, response, messages = as_sample_text(turns)
        else:
            if fields.prompt not in row or row[fields.prompt] is None:
                bad("prompt", f"missing (no value in source column {fields.prompt!r})")
                continue
            prompt = row[fields.prompt]
            response = row.get(fields.response) if fields.response else None
            response = "" if response is None else response  # may be empty: the teacher can write it
            system = row.get(fields.system) if fields.system else None
            problem = (_text_problem("prompt", prompt, max_chars, allow_empty=False)
                       or _text_problem("response", response, max_chars, allow_empty=True)
                       or (system is not None and _text_problem(fields.system, system, max_chars, True)) or None)  # fmt: skip
            if problem:
                bad(*problem)
                continue
            if system and system.strip():  # Open-Orca: the system prompt stays text, the question is the user turn
                turns = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
                messages = json.dumps(turns + ([{"role": "assistant", "content": response}] if response else []),
                                      ensure_ascii=False)  # fmt: skip

        split = row.get(fields.split) if fields.split else None
        if split is None:
            split = default_split
        if not isinstance(split, str) or not split.strip():
            bad("split", f"must be a non-empty string, got {split!r}")
            continue

        if rid is None:
            sample_id = content_id(prompt, response, messages)
        elif rid_text is None:
            bad("sample_id", f"must be a string (or integer), got {_type_name(rid)}")
            continue
        elif not rid_text.strip():
            bad("sample_id", "empty")
            continue
        else:
            sample_id = rid_text
        if sample_id in first_seen:
            rejected.append(
                reject(
                    "samples",
                    "sample_id",
                    f"duplicate sample_id {sample_id!r}: first seen at source position {first_seen[sample_id]}",
                    sample_id=sample_id,
                    source_position=pos,
                )
            )
            continue

        meta_value = row.get(fields.meta) if fields.meta else None
        if isinstance(meta_value, str):  # a JSON object's text (a samples file's own meta column)
            try:
                meta_value = json.loads(meta_value) if meta_value.strip() else None
            except json.JSONDecodeError:
                pass  # refused below, as any other non-object
        if meta_value is not None and not isinstance(meta_value, dict):
            bad("meta", f"must be an object (dict), got {_type_name(meta_value)}")
            continue
        meta = dict(meta_value or {})
        meta.update({k: v for k, v in row.items() if k not in mapped})

        first_seen[sample_id] = pos
        accepted["sample_id"].append(sample_id)
        accepted["prompt"].append(prompt)
        accepted["response"].append(response)
        accepted["split"].append(split)
        accepted["meta"].append(json.dumps(meta, default=str, sort_keys=True))
        accepted["messages"].append(messages)

    schema = schemas.with_metadata(schemas.SAMPLES_SCHEMA, "samples", schemas.SAMPLES_VERSION)
    return IngestResult(pa.table(accepted, schema=schema), rejects_table(rejected))


# --- sources ---------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) per non-blank line. Read as bytes, so one undecodable line is one reject, not the
    end of the ingest; a UTF-8 byte-order mark before the first line is skipped."""
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, {"__invalid__": f"line {line_no}: not valid UTF-8 (byte {exc.start}: {exc.reason})"}
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                # Keep the position: the validator turns a non-dict into a reject.
                yield line_no, {"__invalid__": f"line {line_no}: invalid JSON ({exc.msg})"}
                continue
            yield line_no, value if isinstance(value, dict) else {"__invalid__": f"line {line_no}: not a JSON object"}


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputMismatch(f"--source {path}: not a readable Parquet file ({exc}); give a .parquet table, "
                            f"a .jsonl file or a dataset saved with save_to_disk") from None  # fmt: skip

    def rows():
        index = 0
        for batch in pf.iter_batches():
            for row in batch.to_pylist():
                yield index, row
                index += 1

    return rows()


def read_source(source: str, hf_split: str = "train") -> Iterator[dict | tuple[int, dict]]:
    """Rows from the toy world, a JSONL/Parquet file, a dataset saved with `save_to_disk`, or a Hugging Face
    dataset name. The source is checked now (not when iterated): a path that exists but is none of these,
    or a local-looking path that does not exist, is a one-line error, not a hub lookup."""
    path = Path(source)
    if path.is_file():
        if path.suffix in (".jsonl", ".json"):
            return _read_jsonl(path)
        if path.suffix == ".parquet":
            return _read_parquet(path)
        raise InputMismatch(f"--source {path}: unknown file type {path.suffix!r}; give a .jsonl or .parquet "
                            f"file, a save_to_disk dataset directory or a Hugging Face dataset name")  # fmt: skip
    if path.is_dir():
        import datasets

        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return iter(datasets.load_from_disk(str(path)))
        if (path / "dataset_dict.json").exists():
            dd = datasets.load_from_disk(str(path))
            if hf_split not in dd:
                raise InputMismatch(f"--source {path}: no split {hf_split!r} (it has {sorted(dd)}); pass --hf-split")
            return iter(dd[hf_split])
        raise InputMismatch(f"--source {path} is a directory but not a dataset saved with save_to_disk (no "
                            f"dataset_info.json / dataset_dict.json); give a .jsonl/.parquet file or a "
                            f"dataset directory")  # fmt: skip
    looks_local = source.startswith((".", "/", "~")) or path.suffix in (".jsonl", ".json", ".parquet", ".txt")
    if looks_local or source.count("/") > 1:
        hint = " (the embedded toy world: write it with `python -m toy.world`)" if path == TOY_WORLD_JSONL else ""
        raise MissingInput(f"--source {source}: no such file or directory{hint}")
    import datasets

    try:
        ds = datasets.load_dataset(source, split=hf_split)
    except Exception as exc:  # the hub's own errors vary by version; the name is what the user can fix
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise MissingInput(f"--source {source}: not a local file and not loadable as a Hugging Face dataset "
                           f"({type(exc).__name__}: {first})") from None  # fmt: skip
    return iter(ds)


def ingest(
    source: str = str(TOY_WORLD_JSONL),
    out_dir: Path = schemas.SAMPLES_DIR,
    fields: FieldMap = FieldMap(),
    default_split: str = "train",
    hf_split: str = "train",
    max_chars: int = 8000,
    progress: bool = True,
) -> IngestResult:
    rows = read_source(source, hf_split)
    result = validate(rows, fields, default_split, max_chars, progress)
    if result.samples.num_rows == 0:
        # never replace the samples with nothing; the rejects say why each row failed
        write_table_atomic(result.rejects, rejects_path(out_dir, "samples"))
        kept = Path(out_dir) / SAMPLES_FILE
        raise EmptySource(
            f"--source {source}: no usable sample ({result.rejects.num_rows} rejected"
            + (f", reasons in {rejects_path(out_dir, 'samples')}" if result.rejects.num_rows else ", the source is empty")
            + (f"); {kept} was left as it was" if kept.exists() else ")")
        )
    write_table_atomic(result.samples, Path(out_dir) / SAMPLES_FILE)
    write_table_atomic(result.rejects, rejects_path(out_dir, "samples"))
    return result


def load_samples(samples_dir: Path | str = schemas.SAMPLES_DIR, split: str | None = None) -> pa.Table:
    """The samples table, refusing a file of another artifact or version."""
    path = Path(samples_dir) / SAMPLES_FILE if Path(samples_dir).is_dir() else Path(samples_dir)
    if not path.exists():
        raise MissingInput(f"no samples at {path}: run `python -m pipeline.samples` first")
    table = pq.read_table(path)
    schemas.check_artifact(table.schema, path, "samples", schemas.SAMPLES_VERSION, schemas.SAMPLES_READABLE_VERSIONS)
    if "messages" not in table.column_names:  # version 1: plain samples only
        table = table.append_column(schemas.SAMPLES_SCHEMA.field("messages"), pa.array([""] * table.num_rows))
    if split is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table["split"], split))
    return table


@cli("pipeline.samples")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SamplesConfig, argv, description=__doc__)
    out = Path(cfg.out)
    result = ingest(cfg.source, out, cfg.fields, cfg.split, cfg.hf_split, cfg.max_chars)
    chats = sum(1 for m in result.samples["messages"].to_pylist() if m)
    splits: dict[str, int] = {}
    for s in result.samples["split"].to_pylist():
        splits[s] = splits.get(s, 0) + 1
    by_split = ", ".join(f"{k} {v}" for k, v in sorted(splits.items()))
    print(
        f"samples: {result.samples.num_rows} accepted ({by_split}; {chats} conversations), "
        f"{result.rejects.num_rows} rejected"
        f" -> {out / SAMPLES_FILE}" + (f" (reasons in {rejects_path(out, 'samples')})" if result.rejects.num_rows else "")
    )


if __name__ == "__main__":
    sys.exit(main())

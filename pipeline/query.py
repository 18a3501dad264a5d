"""SQL over every artifact with DuckDB.

    python -m pipeline.query "SELECT * FROM teacher_samples ORDER BY mean_nll DESC LIMIT 20"
    python -m pipeline.query --cache data/cache --views

Views (each only when its files exist):
  samples          sample_id, prompt, response, split, meta, messages (a conversation's turns as JSON; "" for a
                   plain prompt/response sample)
  sample_turns     one row per sample and turn: turn (its message index), role, content
  rejects          every stage's rejects: stage, sample_id, rendition, source_position, field, reason
  audio            the speech index: sample_id, rendition, turn (the spoken user turn), voice, rate_wpm, path,
                   duration_s
  features         sample_id, rendition, voice, turn, n_frames, fbank (the clip's float16 features as bytes; version 1
                   shards: a list; versions 1-2 have no voice column: NULL here)
  cache            the raw cache rows (packed top-k columns included), every partition's
  responses        per cached sample: the response the teacher was scored on (and, with
                   --responses teacher, wrote), response_source (dataset | teacher) and
                   the dataset's own response (samples.parquet is never changed)
  teacher_turns    one row per cached sample and scored assistant turn: turn (0, 1, ... in the row), start (its
                   first position in the conversation's tokens; -1 in a version 3 cache), n_tokens
  teacher_tokens   one row per sample and response position: position, token_id,
                   token_logprob, top1_id, top1_logprob, entropy (of the kept
                   top-k), tail_mass, tail_logmass
                   (a sampled cache, --targets sampled: position, token_id, token_logprob)
  teacher_samples  per sample: n_tokens, mean_nll, mean_entropy, top1_agreement,
                   mean_tail_mass
                   (a sampled cache: n_tokens, mean_nll, distinct_draws_per_token)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import duckdb

from pipeline import schemas
from pipeline.cache import cache_shards, read_manifest
from pipeline.config import opt, parse_config
from pipeline.errors import MissingInput, UserError, cli

TEACHER_TOKENS = """
SELECT sample_id,
       unnest(range(n_tokens)) AS position,
       unnest(token_ids) AS token_id,
       unnest(token_logprobs) AS token_logprob,
       unnest(top1_ids) AS top1_id,
       unnest(top1_logprobs) AS top1_logprob,
       unnest(entropy) AS entropy,
       exp(unnest(tail_logmass)) AS tail_mass,
       unnest(tail_logmass) AS tail_logmass
FROM cache
"""

TEACHER_SAMPLES = """
SELECT sample_id,
       count(*) AS n_tokens,
       -avg(token_logprob) AS mean_nll,
       avg(entropy) AS mean_entropy,
       avg(CAST(top1_id = token_id AS DOUBLE)) AS top1_agreement,
       avg(tail_mass) AS mean_tail_mass
FROM teacher_tokens
GROUP BY sample_id
"""


SAMPLED_TOKENS = """
SELECT sample_id,
       unnest(range(n_tokens)) AS position,
       unnest(token_ids) AS token_id,
       unnest(token_logprobs) AS token_logprob
FROM cache
"""

SAMPLED_SAMPLES = """
SELECT sample_id,
       n_tokens,
       -list_avg(token_logprobs) AS mean_nll,
       len(draw_counts) / n_tokens AS distinct_draws_per_token
FROM cache
"""


SAMPLE_TURNS = """
SELECT sample_id, split, generate_subscripts(m, 1) - 1 AS turn, unnest(m).role AS role, unnest(m).content AS content
FROM (SELECT sample_id, split,
             CASE WHEN messages <> '' THEN from_json(messages, '[{"role": "VARCHAR", "content": "VARCHAR"}]')
                  ELSE list_filter([{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': response}],
                                   lambda x: x.content <> '') END AS m
      FROM samples)
"""

# a version 3 shard has no turn columns (NULL under union_by_name): one turn, start unknown
TEACHER_TURNS = """
SELECT sample_id, unnest(range(len(l))) AS turn, unnest(s) AS start, unnest(l) AS n_tokens
FROM (SELECT sample_id, coalesce(turn_starts, [-1]) AS s, coalesce(turn_lengths, [n_tokens]) AS l FROM cache)
"""


def _glob(directory: Path, pattern: str) -> str | None:
    return str(directory / pattern) if any(directory.glob(pattern)) else None


def connect(data_dir: Path = schemas.DATA_DIR, cache_dir: Path | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views over the artifacts that exist."""
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir else data_dir / "cache"
    con = duckdb.connect()
    sources = {
        "samples": _glob(data_dir / "samples", "samples.parquet"),
        "audio": _glob(data_dir / "audio", "index.parquet"),
        "features": _glob(data_dir / "features", "part-*.parquet"),
    }
    for name, glob in sources.items():
        if glob is not None:
            # union_by_name: a features store may hold shards of several versions (a voice column since version 3)
            con.sql(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{glob}', union_by_name=true)")
    if sources["samples"]:
        if "messages" not in con.sql("SELECT * FROM samples LIMIT 0").columns:  # a version 1 samples file
            con.sql(f"CREATE OR REPLACE VIEW samples AS SELECT *, '' AS messages FROM read_parquet('{sources['samples']}')")
        con.sql(f"CREATE VIEW sample_turns AS {SAMPLE_TURNS}")
    # the shards the cache's manifests list (all partitions), not whatever files match a glob
    shards = [str(path) for path, _ in cache_shards(cache_dir)]
    sources["cache"] = shards or None
    if shards:
        files = ", ".join(f"'{p}'" for p in shards)
        con.sql(f"CREATE VIEW cache AS SELECT * FROM read_parquet([{files}], union_by_name=true)")
        con.sql(f"CREATE VIEW teacher_turns AS {TEACHER_TURNS}")
        fingerprint = (read_manifest(cache_dir) or {}).get("fingerprint", {})
        source = fingerprint.get("responses", "dataset")
        dataset = "s.response" if sources["samples"] else "NULL"
        join = "LEFT JOIN samples s USING (sample_id)" if sources["samples"] else ""
        con.sql(f"CREATE VIEW responses AS SELECT c.sample_id, c.response, '{source}' AS response_source, "
                f"{dataset} AS dataset_response FROM cache c {join}")  # fmt: skip
    # Every stage's rejects; a cache outside data/ keeps its own beside it.
    reject_globs = {g for d in (data_dir, cache_dir.parent) if (g := _glob(d / "rejects", "*.parquet"))}
    if reject_globs:
        files = ", ".join(f"'{g}'" for g in sorted(reject_globs))
        con.sql(f"CREATE VIEW rejects AS SELECT * FROM read_parquet([{files}], union_by_name=true)")
    if sources["cache"]:
        sampled = fingerprint.get("targets") == "sampled"
        con.sql(f"CREATE VIEW teacher_tokens AS {SAMPLED_TOKENS if sampled else TEACHER_TOKENS}")
        con.sql(f"CREATE VIEW teacher_samples AS {SAMPLED_SAMPLES if sampled else TEACHER_SAMPLES}")
    return con


def views(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()]


@dataclass
class QueryConfig:
    """`python -m pipeline.query`: a SQL query over the views of one data directory."""

    sql: str | None = opt(None, "the query (none: list the views)", positional=True)
    data: str = opt(str(schemas.DATA_DIR), "data directory")
    cache: str | None = opt(None, "cache directory (default: <data>/cache)")
    views: bool = opt(False, "list the views and their columns")
    max_rows: int = opt(40, "rows to print")
    csv: bool = opt(False, "print CSV instead of a table")


@cli("pipeline.query")
def main(argv: list[str] | None = None) -> int:
    args = parse_config(QueryConfig, argv, description=__doc__)
    if not Path(args.data).is_dir():
        raise MissingInput(f"--data {args.data}: no such directory; run the cache-teacher flow first or point --data "
                           f"at its data directory")  # fmt: skip
    con = connect(Path(args.data), Path(args.cache) if args.cache else None)
    if args.views or not args.sql:
        for v in views(con):
            cols = ", ".join(r[0] for r in con.sql(f"DESCRIBE {v}").fetchall())
            print(f"{v}: {cols}")
        if not views(con):
            print(f"no artifacts under {args.data}: run `make demo` first", file=sys.stderr)
        return 0
    try:
        rel = con.sql(args.sql)
    except duckdb.Error as exc:
        raise UserError(f"query failed: {exc} (views: {', '.join(views(con)) or 'none'})") from None
    if rel is None:
        return 0
    if args.csv:
        rel.to_df().to_csv(sys.stdout, index=False)
    else:
        rel.show(max_rows=args.max_rows, max_width=200)
    return 0


if __name__ == "__main__":
    sys.exit(main())

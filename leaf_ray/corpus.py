"""Where a corpus comes from, and how its columns become records.

Sources (:func:`resolve_corpus` turns each into a list of files that Ray Data reads in pieces of
about ``scoring.read_chunk_bytes``, a task per piece (:func:`corpus_chunks`), so a large dataset
never passes through the driver nor whole through one task):

- a JSONL / JSON / Parquet file, or a folder of them;
- a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``
  whose ``split`` is taken): its Arrow files;
- ``hf:<repo_id>``: a Hugging Face dataset in the local hub cache (``HF_HUB_CACHE``), with
  ``split`` and an optional ``subset`` (the config folder, e.g. GSM8K's ``main``). Nothing
  is downloaded; a dataset that is not cached is an error that says how to fetch it.

Columns (:func:`canonical_row`): a :class:`~leaf_ray.config.ColumnMapping` names the
instruction, response, answer and id columns, or a chat ``messages`` column. A row without
an id gets one from a hash of its content, the same on every rerun.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from leaf_ray.config import ColumnMapping, ScoringConfig
from leaf_ray.data import SUPPORTED_SUFFIXES, RecordError, corpus_files, decode_batches, decode_jsonl, decode_rows

HUB_PREFIX = "hf:"


def check_corpus(scoring: ScoringConfig) -> list[Path]:
    """The corpus's files, after checking that they exist and have the mapped columns: the
    pre-flight every entry point runs before starting Ray work (FileNotFoundError or
    ValueError, each naming the field to change)."""
    files = resolve_corpus(scoring.corpus, scoring.split, scoring.subset)
    check_columns(files, scoring.columns)
    return files


def resolve_corpus(corpus: str, split: str = "train", subset: str | None = None) -> list[Path]:
    """The files of ``corpus`` (a path or ``hf:<repo_id>``), in a stable order."""
    if corpus.startswith(HUB_PREFIX):
        return hub_dataset_files(corpus.removeprefix(HUB_PREFIX), split, subset)
    path = Path(corpus)
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise ValueError(f"scoring.split: {split!r} is not a split of {path}; it has {', '.join(splits)}")
        path = path / split
    if (path / "state.json").exists():  # a save_to_disk Dataset: its Arrow shards, in order
        return [path / entry["filename"] for entry in json.loads((path / "state.json").read_text())["_data_files"]]
    return corpus_files(path)


def hub_dataset_files(repo_id: str, split: str, subset: str | None) -> list[Path]:
    """The cached files of one split of a hub dataset (``<subset>/<split>-*.parquet``,
    ``data/<split>-*``, ``<subset>/<split>/*`` and the like)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = os.environ.get("HF_HUB_CACHE", HF_HUB_CACHE)  # read now, not at import, so a caller may set it
    try:
        root = Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True, cache_dir=cache))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"scoring.corpus: dataset {repo_id!r} is not in the local Hugging Face cache ({cache}). "
            f"Fetch it on a machine with network (`huggingface-cli download --repo-type dataset {repo_id}`, "
            f"or datasets.load_dataset({repo_id!r})) and point HF_HUB_CACHE at that cache, or save it with "
            "save_to_disk and give that folder as the corpus") from None
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)

    def wanted(file: Path) -> bool:
        parts = file.relative_to(root).parts
        in_subset = subset is None or parts[0] == subset
        names_split = file.name.startswith((f"{split}-", f"{split}.", f"{split}_")) or split in parts[:-1]
        return in_subset and names_split

    chosen = [f for f in files if wanted(f)]
    subsets = sorted({f.relative_to(root).parts[0] for f in chosen if len(f.relative_to(root).parts) > 1})
    if subset is None and len(subsets) > 1:  # e.g. GSM8K's main/ and socratic/: never mix them silently
        raise ValueError(f"scoring.subset: cached dataset {repo_id!r} has split {split!r} in several subsets "
                         f"({', '.join(subsets)}); choose one")
    if not chosen:
        listed = ", ".join(str(f.relative_to(root)) for f in files[:12]) or "none"
        raise FileNotFoundError(f"scoring.split / scoring.subset: no files of split {split!r}"
                                f"{f' in subset {subset!r}' if subset else ''} in cached dataset {repo_id!r}; "
                                f"its data files: {listed}")
    return chosen


def file_columns(path: Path) -> list[str]:
    """The column names of one corpus file, read from its schema or first record."""
    if path.suffix == ".parquet":
        return pq.read_schema(path).names
    if path.suffix == ".arrow":
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).schema.names
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    return list(json.loads(line))
        return []
    rows = json.loads(path.read_text(encoding="utf-8"))
    return list(rows[0]) if isinstance(rows, list) and rows and isinstance(rows[0], dict) else []


def check_columns(files: list[Path], columns: ColumnMapping) -> None:
    """A config error, before any Ray work, when a mapped column is not in the corpus.

    Checked against Parquet and Arrow schemas, and against the first JSON record when the
    mapping was set explicitly; otherwise a JSON row missing a field is that row's error.
    """
    if files[0].suffix not in (".parquet", ".arrow") and not columns.model_fields_set:
        return
    try:
        available = file_columns(files[0])
    except (ValueError, UnicodeDecodeError):  # an unreadable first row: reported per record
        return
    for field, column in columns.required().items():
        if column not in available:
            raise ValueError(f"scoring.columns.{field}: column {column!r} is not in the corpus "
                             f"({files[0]}); its columns are: {', '.join(available) or 'none'}")


def content_id(instruction: str, response: str) -> str:
    """A stable id for a record that has none: a hash of its text."""
    return "sha1-" + hashlib.sha1(json.dumps([instruction, response]).encode()).hexdigest()[:16]


def from_messages(messages: Any) -> tuple[Any, Any]:
    """(instruction, response): the last user turn followed by an assistant turn."""
    if not isinstance(messages, list):
        raise RecordError(f"messages must be a list of turns, got {type(messages).__name__}")
    for index in range(len(messages) - 1, 0, -1):
        turn, before = messages[index], messages[index - 1]
        if (isinstance(turn, dict) and isinstance(before, dict)
                and turn.get("role") == "assistant" and before.get("role") == "user"):
            return before.get("content"), turn.get("content")
    raise RecordError("messages has no user turn followed by an assistant turn")


def json_native(value: Any, column: str) -> Any:
    """``value`` as JSON can hold it, so that every stage can write it: Parquet and Arrow
    columns bring dates, times, decimals and bytes. Dates and times become ISO 8601 text, a
    duration its seconds, a decimal its exact text, bytes their UTF-8 text (else base64)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(key): json_native(item, column) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_native(item, column) for item in value]
    if isinstance(value, (datetime.date, datetime.time)):  # datetime (and pandas' Timestamp) included
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    raise RecordError(f"column {column!r}: a {type(value).__name__} value has no JSON form")


def canonical_row(obj: Any, columns: ColumnMapping) -> dict[str, Any]:
    """A corpus row in the record schema (id, instruction, response, answer, meta), ready for
    :func:`leaf_ray.data.parse_record`; raises RecordError for a row that cannot map."""
    if not isinstance(obj, dict):
        raise RecordError(f"record must be a JSON object, got {type(obj).__name__}")
    obj = {key: json_native(value, key) for key, value in obj.items()}
    if columns.messages:
        instruction, response = from_messages(obj.get(columns.messages))
    else:
        instruction, response = obj.get(columns.instruction), obj.get(columns.response)
    used = {columns.messages, columns.instruction, columns.response, columns.answer, columns.id, "meta"} - {None}
    meta = obj.get("meta") or {}
    extra = {k: v for k, v in obj.items() if k not in used}  # provenance columns are kept, in meta
    row = {"instruction": instruction, "response": response,
           "answer": obj.get(columns.answer) if columns.answer else None,
           "meta": {**meta, **extra} if isinstance(meta, dict) else meta}  # a non-object meta: parse_record says so
    raw_id = obj.get(columns.id) if columns.id else None
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        if not (isinstance(instruction, str) and isinstance(response, str)):
            raise RecordError("row has no id and no instruction/response text to derive one from")
        raw_id = content_id(instruction, response)
    return {"id": raw_id, **row}


# Reading in pieces: what one read task holds is a piece of about ``chunk_bytes``, never a whole
# big file. A chunk is a dict (it travels as a Ray Data row): ``path``; ``start``/``end``, the
# byte range of a JSONL file whose lines it owns (a line belongs to the range it starts in);
# ``row_groups`` of a Parquet file; ``lines_before``, the lines (rows) of the file before it.


def corpus_chunks(files: list[Path], chunk_bytes: int,
                  count_newlines: Callable[[list[tuple[str, int, int]]], list[int]] | None = None) -> list[dict[str, Any]]:
    """The read pieces of ``files``, in corpus order. A JSONL file is cut into byte ranges, a
    Parquet file into runs of row groups (by uncompressed size), each of about ``chunk_bytes``; a
    JSON array or an Arrow stream is one piece (neither can be split without reading it whole).
    ``count_newlines`` counts the newlines of byte ranges (path, start, end), so that every
    piece knows its first line's number; by default in this process (the Ray job counts them in
    tasks, a range each)."""
    count_newlines = count_newlines or (lambda ranges: [newlines_in(*r) for r in ranges])
    chunks = []
    for path in files:
        size = path.stat().st_size
        if path.suffix == ".jsonl" and size > chunk_bytes:
            starts = list(range(0, size, chunk_bytes))
            counts = count_newlines([(str(path), start, start + chunk_bytes) for start in starts[:-1]])
            before = [0, *itertools.accumulate(counts)]
            chunks += [whole_file(path, start=start, end=min(start + chunk_bytes, size), lines_before=lines)
                       for start, lines in zip(starts, before)]
        elif path.suffix == ".parquet" and (groups := row_group_runs(path, chunk_bytes)) is not None:
            chunks += [whole_file(path, row_groups=run, lines_before=rows) for run, rows in groups]
        else:
            chunks.append(whole_file(path))
    return chunks


def whole_file(path: Path, **fields: Any) -> dict[str, Any]:
    """A chunk: the whole file unless ``fields`` narrow it."""
    return {"path": str(path), "start": 0, "end": path.stat().st_size, "row_groups": [], "lines_before": 0, **fields}


def row_group_runs(path: Path, chunk_bytes: int) -> list[tuple[list[int], int]] | None:
    """Runs of a Parquet file's row groups of about ``chunk_bytes``, each with the rows before it;
    None for a file whose footer does not read (read whole, it becomes that file's error row)."""
    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowException, OSError):
        return None
    runs, run, run_bytes, rows = [], [], 0, 0
    for index in range(meta.num_row_groups):
        group = meta.row_group(index)
        run.append(index)
        run_bytes += group.total_byte_size
        if run_bytes >= chunk_bytes or index == meta.num_row_groups - 1:
            runs.append((run, rows))
            rows += sum(meta.row_group(i).num_rows for i in run)
            run, run_bytes = [], 0
    return runs


def newlines_in(path: str, start: int, end: int, block: int = 1 << 20) -> int:
    """The newlines in bytes [start, end) of a file, read a MiB at a time."""
    count = 0
    with open(path, "rb") as handle:
        handle.seek(start)
        while start < end and (data := handle.read(min(block, end - start))):
            count += data.count(b"\n")
            start += len(data)
    return count


def read_chunk(chunk: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    """(line or row number, decoded object or RecordError) for each row a chunk owns."""
    path, source = Path(chunk["path"]), chunk["path"]
    if path.suffix == ".jsonl":
        content, lines_before = jsonl_range(path, chunk["start"], chunk["end"], chunk["lines_before"])
        yield from decode_jsonl(content, source, first_line=lines_before + 1)
    elif chunk["row_groups"]:
        try:
            batches = pq.ParquetFile(path).read_row_groups(list(chunk["row_groups"])).to_batches()
        except (pa.ArrowException, OSError) as exc:
            yield 0, RecordError(f"file is not a readable parquet file: {exc}", source=source)
            return
        yield from decode_batches(batches, source, rows_before=chunk["lines_before"])
    else:
        yield from decode_rows(path.read_bytes(), path.suffix, source)


def jsonl_range(path: Path, start: int, end: int, lines_before: int) -> tuple[bytes, int]:
    """The bytes of the lines that start in [start, end), and the lines before the first of them
    (``lines_before`` counts the newlines before ``start``; a line cut by ``start`` is its
    previous range's, and adds one)."""
    with path.open("rb") as handle:
        if start > 0:
            handle.seek(start - 1)
            if handle.read(1) != b"\n" and handle.readline().endswith(b"\n"):
                lines_before += 1
        first = handle.tell()
        content = handle.read(max(0, end - first))
        if content and not content.endswith(b"\n"):
            content += handle.readline()  # the last line runs past ``end``: it is still ours
    return content, lines_before

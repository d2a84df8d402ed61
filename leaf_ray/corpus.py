"""Where a corpus comes from, and how its columns become records.

Sources (:func:`resolve_corpus` turns each into a list of files that Ray Data reads, one
task per file, so a large dataset never passes through the driver):

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
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from leaf_ray.config import ColumnMapping, ScoringConfig
from leaf_ray.data import SUPPORTED_SUFFIXES, RecordError, corpus_files

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

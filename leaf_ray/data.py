"""Corpus records, readers, and chat-template rendering with character offsets.

Every stage speaks one record schema (:class:`Record`). Readers never stop at a bad
record when asked to collect errors: the job writes it to ``errors/`` and goes on.

Rendering locates the instruction and the response inside the chat-templated text by
*character offsets*, then maps tokens onto them with the tokenizer's offset mapping.
It never counts special tokens or assumes token positions, so it works for any
chat template and any fast tokenizer.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


class RecordError(ValueError):
    """A record that cannot be used, with where it came from and why."""

    def __init__(self, reason: str, *, record_id: str | None = None, line: int | None = None,
                 source: str | None = None):
        self.reason = reason
        self.record_id = record_id
        self.line = line
        self.source = source
        where = ", ".join(
            part for part in (
                f"id={record_id!r}" if record_id is not None else "",
                f"line {line}" if line is not None else "",
                source or "",
            ) if part
        )
        super().__init__(f"{reason} ({where})" if where else reason)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.record_id, "line": self.line, "source": self.source, "reason": self.reason}


@dataclass(frozen=True)
class Record:
    """One training sample: an instruction (prompt) and the response to learn.

    ``target_start`` is where the learned part of the response starts. Before it is context
    the model is given, not trained on: a response-level pair's reasoning prefix, as the
    official code puts it in the prompt. 0 (the whole response is learned) for corpus records.
    """

    id: str
    instruction: str
    response: str
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    target_start: int = 0

    @property
    def prefix(self) -> str:
        """The part of the response given as context (generation continues after it)."""
        return self.response[:self.target_start]

    def to_dict(self) -> dict[str, Any]:
        row = {"id": self.id, "instruction": self.instruction, "response": self.response,
               "answer": self.answer, "meta": self.meta}
        return {**row, "target_start": self.target_start} if self.target_start else row

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Record:
        """A record from a row we wrote ourselves (provenance columns such as ``source_id`` are dropped)."""
        return cls(row["id"], row["instruction"], row["response"], row.get("answer"), row.get("meta") or {},
                   row.get("target_start", 0))


Level = Literal["instruction", "response"]


@dataclass
class TrainingPair:
    """An original record and the counterfactuals cut from it (possibly none): what distillation
    trains on. ``level`` says where they were cut: in the instruction, or in the reasoning
    prefix (then every record of the pair has ``target_start`` at the end of its prefix)."""

    original: Record
    counterfactuals: list[Record] = field(default_factory=list)
    level: Level = "instruction"


def parse_record(obj: Any, *, line: int | None = None, source: str | None = None) -> Record:
    """Validate one decoded JSON object (or Parquet row) into a :class:`Record`."""
    if not isinstance(obj, dict):
        raise RecordError(f"record must be a JSON object, got {type(obj).__name__}", line=line, source=source)
    raw_id = obj.get("id")
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        raise RecordError("missing field 'id'", line=line, source=source)
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
        raise RecordError(f"field 'id' must be a string or integer, got {type(raw_id).__name__}",
                          line=line, source=source)
    record_id = str(raw_id)

    def text_field(name: str) -> str:
        value = obj.get(name)
        if value is None:
            raise RecordError(f"missing field {name!r}", record_id=record_id, line=line, source=source)
        if not isinstance(value, str):
            raise RecordError(f"field {name!r} must be a string, got {type(value).__name__}",
                              record_id=record_id, line=line, source=source)
        if not value.strip():
            raise RecordError(f"field {name!r} is empty", record_id=record_id, line=line, source=source)
        return value

    instruction = text_field("instruction")
    response = text_field("response")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise RecordError(f"field 'answer' must be a string or number, got {type(answer).__name__}",
                          record_id=record_id, line=line, source=source)
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise RecordError(f"field 'meta' must be an object, got {type(meta).__name__}",
                          record_id=record_id, line=line, source=source)
    unknown = set(obj) - {"id", "instruction", "response", "answer", "meta"}
    if unknown:
        # Extra columns are kept, not rejected: real corpora carry provenance fields.
        meta = {**meta, **{key: obj[key] for key in sorted(unknown)}}
    return Record(record_id, instruction, response, None if answer is None else str(answer), meta)


def corpus_files(path: str | Path) -> list[Path]:
    """The corpus files at ``path``: the file itself, or every supported file in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no {'/'.join(SUPPORTED_SUFFIXES)} files under {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"corpus not found: {path}")
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"unsupported corpus format {path.suffix!r} for {path}; use {SUPPORTED_SUFFIXES}")
    return [path]


def decode_rows(content: bytes, suffix: str, source: str) -> Iterator[tuple[int, Any]]:
    """(line or row number, decoded object) for one corpus file's bytes; a row that does not
    decode yields a RecordError in place of the object."""
    if suffix == ".jsonl":
        yield from decode_jsonl(content, source)
    elif suffix == ".json":
        try:
            rows = json.loads(content.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            # A broken JSON array cannot be split into rows: the whole file is one error.
            yield 0, RecordError(f"file is not a valid UTF-8 JSON array: {exc}", source=source)
            return
        if not isinstance(rows, list):
            yield 0, RecordError("a .json corpus must hold a JSON array of records", source=source)
            return
        yield from enumerate(rows, start=1)
    elif suffix in (".parquet", ".arrow"):
        try:  # an Arrow IPC stream is what datasets' save_to_disk writes
            batches = (pq.read_table(pa.BufferReader(content)).to_batches() if suffix == ".parquet"
                       else list(pa.ipc.open_stream(pa.BufferReader(content))))
        except (pa.ArrowException, OSError) as exc:
            yield 0, RecordError(f"file is not a readable {suffix[1:]} file: {exc}", source=source)
            return
        yield from decode_batches(batches, source)
    else:
        raise ValueError(f"unsupported corpus format {suffix!r} for {source}; use {SUPPORTED_SUFFIXES}")


def decode_jsonl(content: bytes, source: str, first_line: int = 1) -> Iterator[tuple[int, Any]]:
    """(line number, decoded object or RecordError) for JSONL bytes whose first line is ``first_line``."""
    for line_no, raw in enumerate(content.split(b"\n"), start=first_line):
        if not raw.strip():
            continue
        try:
            yield line_no, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield line_no, RecordError(f"line is not valid UTF-8: {exc.reason} at byte {exc.start}",
                                       line=line_no, source=source)
        except json.JSONDecodeError as exc:
            yield line_no, RecordError(f"malformed JSON: {exc.msg} at column {exc.colno}",
                                       line=line_no, source=source)


def decode_batches(batches: Iterable[pa.RecordBatch], source: str, rows_before: int = 0) -> Iterator[tuple[int, Any]]:
    """(row number, row dict or RecordError) for Arrow batches that follow ``rows_before`` rows of their file."""
    row_no = rows_before
    for batch in batches:
        for row in arrow_rows(batch, source, row_no):
            row_no += 1
            yield row_no, row


def arrow_rows(batch: pa.RecordBatch, source: str, first_row: int) -> Iterator[Any]:
    """The rows of one Arrow batch as Python dicts. A value Python cannot hold (a date past
    year 9999, say) fails the whole batch's conversion, so that batch is converted row by row
    and only the bad row becomes a RecordError, naming its column."""
    try:
        rows = batch.to_pylist()
    except (pa.ArrowException, OverflowError, ValueError):
        rows = None
    if rows is not None:
        yield from rows
        return
    for index in range(batch.num_rows):
        row = batch.slice(index, 1)
        try:
            value = row.to_pylist()[0]
        except (pa.ArrowException, OverflowError, ValueError) as exc:
            bad = [name for name, column in zip(row.schema.names, row.columns) if not _converts(column)]
            value = RecordError(f"column {', '.join(map(repr, bad))} cannot be read: {exc}",
                                line=first_row + index + 1, source=source)
        yield value


def _converts(column: pa.Array) -> bool:
    try:
        column.to_pylist()
        return True
    except (pa.ArrowException, OverflowError, ValueError):
        return False


def iter_records(path: str | Path, errors: list[RecordError] | None = None, columns=None) -> Iterator[Record]:
    """Yield the valid records of a corpus file or folder, in file order, through the column
    mapping (:func:`leaf_ray.corpus.canonical_row`; default: the record schema's names).

    With ``errors=None`` the first bad record raises :class:`RecordError`; with a list,
    bad records are appended to it and reading goes on. Duplicate ids are errors too.
    """
    from leaf_ray.config import ColumnMapping
    from leaf_ray.corpus import canonical_row

    columns = columns or ColumnMapping()
    seen: dict[str, str] = {}  # id -> where it first appears
    for path_ in corpus_files(path):
        for line_no, obj in decode_rows(path_.read_bytes(), path_.suffix, str(path_)):
            try:
                if isinstance(obj, RecordError):
                    raise obj
                try:
                    row = canonical_row(obj, columns)
                except RecordError as exc:
                    raise RecordError(exc.reason, line=line_no, source=str(path_)) from None
                record = parse_record(row, line=line_no, source=str(path_))
                if record.id in seen:
                    raise RecordError(f"duplicate id {record.id!r}, first at {seen[record.id]}", record_id=record.id,
                                      line=line_no, source=str(path_))
                seen[record.id] = f"{path_}:{line_no}"
            except RecordError as exc:
                if errors is None:
                    raise
                errors.append(exc)
                continue
            yield record


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- rendering

# Placeholders that no chat template rewrites: no whitespace to trim, no markup.
_INSTRUCTION_SENTINEL = "LEAFRAYINSTRUCTIONSENTINEL"
_RESPONSE_SENTINEL = "LEAFRAYRESPONSESENTINEL"


def overlapping_tokens(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the (non-empty) tokens whose characters overlap ``span``."""
    start, end = span
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]


@dataclass(frozen=True)
class RenderedSample:
    """A chat-templated (instruction, response) pair with character spans and tokens.

    ``instruction_span`` / ``response_span`` are ``(start, end)`` character offsets into
    ``text``. ``instruction_shift`` / ``response_shift`` map an offset inside the rendered
    part back to the original string (templates may trim leading whitespace).
    """

    text: str
    instruction_span: tuple[int, int]
    response_span: tuple[int, int]
    instruction_shift: int
    response_shift: int
    input_ids: list[int]
    offsets: list[tuple[int, int]]

    def token_indices(self, span: tuple[int, int]) -> list[int]:
        return overlapping_tokens(self.offsets, span)

    def completion_tokens(self, target_start: int = 0) -> list[int]:
        """Tokens a model is trained to produce: the response from ``target_start`` (a character
        of the original response) and the template's closing markup after it (the end-of-turn
        token, so that generation learns to stop)."""
        start = self.response_span[0] + max(0, target_start - self.response_shift)
        return self.token_indices((start, len(self.text)))


def pad_token_id(tokenizer) -> int:
    """The id padded positions hold. Llama 3 and Gemma-style tokenizers may have no pad token;
    padded positions are masked out everywhere, so any real id works: EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def length_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped, shortest first, so that each padded batch holds at most ``max_tokens``
    (a longer record is a batch of its own)."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and lengths[index] * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    return batches + [current] if current else batches


def pad_batch(rows: Sequence[Sequence[int]], targets: Sequence[Sequence[int]] | None = None, pad_id: int = 0,
              side: str = "right") -> dict[str, Any]:
    """Pad token rows to the longest one (the only padder here).

    ``target_mask`` marks the listed token indices of each row; ``offsets[b]`` is where row
    ``b``'s first token landed (non-zero only with left padding, as generation wants).
    """
    import torch

    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    offsets = torch.tensor([width - len(ids) if side == "left" else 0 for ids in rows], dtype=torch.long)
    for i, ids in enumerate(rows):
        at = int(offsets[i])
        input_ids[i, at:at + len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[i, at:at + len(ids)] = 1
        if targets is not None:
            target_mask[i, [at + t for t in targets[i]]] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask,
            "offsets": offsets}


def encode_for_training(tokenizer, records: Sequence[Record]) -> dict[str, Any]:
    """Right-padded chat renderings of full records, with the completion tokens (from each
    record's ``target_start``) as targets."""
    rendered = [render_sample(tokenizer, r.instruction, r.response) for r in records]
    targets = [x.completion_tokens(r.target_start) for x, r in zip(rendered, records)]
    return pad_batch([x.input_ids for x in rendered], targets, pad_token_id(tokenizer))


def _render(tokenizer, instruction: str, response: str | None) -> str:
    messages = [{"role": "user", "content": instruction}]
    if response is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def render_prompt(tokenizer, instruction: str) -> str:
    """The generation prompt for ``instruction``: what a server or ``generate`` sees."""
    return _render(tokenizer, instruction, None)


def prompt_token_ids(tokenizer, instruction: str, prefix: str = "") -> list[int]:
    """The token ids of :func:`render_prompt` followed by ``prefix`` (the start of the answer to
    continue from), as every generator here (transformers, vLLM) gets them."""
    return tokenizer(render_prompt(tokenizer, instruction) + prefix, add_special_tokens=False)["input_ids"]


def _views(content: str) -> tuple[tuple[str, int], ...]:
    """The ways a template may show ``content``: as is, or trimmed (with the leading cut)."""
    return ((content, 0), (content.strip(), len(content) - len(content.lstrip())))


# Per tokenizer: its chat template and the markup that template puts around the two messages.
_SKELETONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _skeleton(tokenizer, fresh: bool = False) -> tuple[str, str, str]:
    """The template's markup before, between and after the messages, rendered once with
    sentinels and cached per tokenizer (rendering it on every record cost as much as
    rendering the record)."""
    cached = _SKELETONS.get(tokenizer)
    if cached is not None and cached[0] == tokenizer.chat_template and not fresh:
        return cached[1]
    skeleton = _render(tokenizer, _INSTRUCTION_SENTINEL, _RESPONSE_SENTINEL)
    i_at = skeleton.find(_INSTRUCTION_SENTINEL)
    r_at = skeleton.find(_RESPONSE_SENTINEL)
    if i_at < 0 or r_at < i_at:
        raise ValueError("chat template does not place the user message before the assistant message")
    parts = (skeleton[:i_at], skeleton[i_at + len(_INSTRUCTION_SENTINEL):r_at],
             skeleton[r_at + len(_RESPONSE_SENTINEL):])
    _SKELETONS[tokenizer] = (tokenizer.chat_template, parts)
    return parts


def render_sample(tokenizer, instruction: str, response: str) -> RenderedSample:
    """Render through the tokenizer's chat template and locate both parts by character offsets.

    The template, rendered with sentinels in place of the contents, splits into the fixed
    markup around them (:func:`_skeleton`); the real rendering must then be exactly
    ``markup + instruction + markup + response + markup``, with the contents possibly
    trimmed (Llama 3's template trims). Anything else is a template we cannot align, and
    we say so rather than guess.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("a fast tokenizer (tokenizers-backed) is required for offset mapping")
    text = _render(tokenizer, instruction, response)
    # A cached markup can go stale (a template that prints today's date): render it afresh once.
    for fresh in (False, True):
        head, middle, tail = _skeleton(tokenizer, fresh)
        for instr_view, i_shift in _views(instruction):
            for resp_view, r_shift in _views(response):
                if text == head + instr_view + middle + resp_view + tail:
                    i_start = len(head)
                    r_start = i_start + len(instr_view) + len(middle)
                    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                    return RenderedSample(
                        text=text,
                        instruction_span=(i_start, i_start + len(instr_view)),
                        response_span=(r_start, r_start + len(resp_view)),
                        instruction_shift=i_shift,
                        response_shift=r_shift,
                        input_ids=list(encoded["input_ids"]),
                        offsets=[tuple(o) for o in encoded["offset_mapping"]],
                    )
    raise ValueError("chat template rewrites message contents beyond trimming whitespace; "
                     "cannot locate instruction and response by character offsets")

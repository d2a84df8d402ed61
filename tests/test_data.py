"""Corpus readers and chat-template rendering by character offsets."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaf_ray.data import RecordError, iter_records, render_prompt, render_sample


def write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def good(i: int) -> dict:
    return {"id": f"r{i}", "instruction": f"ann has {i} .", "response": str(i), "answer": str(i)}


def test_jsonl_collects_bad_rows_with_line_and_id(tmp_path):
    corpus = tmp_path / "c.jsonl"
    write_lines(corpus, [
        json.dumps(good(1)).encode(),
        b'{"id": "broken", "instruction": ',                       # malformed JSON
        json.dumps({"id": "r2", "instruction": "x"}).encode(),     # missing response
        json.dumps({**good(3), "instruction": "   "}).encode(),    # empty instruction
        b'{"id": "r4", "instruction": "caf\xe9", "response": "1"}',  # not UTF-8
        json.dumps(good(1)).encode(),                              # duplicate id
        json.dumps({**good(5), "meta": {"k": 1}, "source": "s"}).encode(),
    ])
    errors: list[RecordError] = []
    records = list(iter_records(corpus, errors))
    assert [r.id for r in records] == ["r1", "r5"]
    assert records[1].meta == {"k": 1, "source": "s"}
    reasons = {(e.line, e.record_id): e.reason for e in errors}
    assert "malformed JSON" in reasons[(2, None)]
    assert reasons[(3, "r2")] == "missing field 'response'"
    assert reasons[(4, "r3")] == "field 'instruction' is empty"
    assert "not valid UTF-8" in reasons[(5, None)]
    assert reasons[(6, "r1")] == f"duplicate id 'r1', first at {corpus}:1"
    with pytest.raises(RecordError, match=r"malformed JSON.*line 2"):
        list(iter_records(corpus))


def test_json_array_parquet_and_folder(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([good(1), good(2)]))
    pq.write_table(pa.Table.from_pylist([good(3), {**good(4), "answer": None}]), tmp_path / "b.parquet")
    records = list(iter_records(tmp_path))
    assert [r.id for r in records] == ["r1", "r2", "r3", "r4"]
    assert records[3].answer is None
    (tmp_path / "c.json").write_text('{"not": "an array"}')
    errors: list[RecordError] = []
    assert len(list(iter_records(tmp_path, errors))) == 4
    assert "JSON array" in errors[0].reason


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        list(iter_records(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("which", ["byte", "metaspace"])
@pytest.mark.parametrize("instruction", ["ann has 3 . how many ?", "  padded instruction \n", "a\nmulti-line 東京 🙂 prompt"])
def test_render_locates_instruction_and_response(which, instruction, request):
    tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    response = "Step 1: 3.\nThe answer is 3"
    rendered = render_sample(tokenizer, instruction, response)
    i0, i1 = rendered.instruction_span
    r0, r1 = rendered.response_span
    shown = rendered.text[i0:i1]
    # The byte template trims contents, the ChatML one does not.
    assert shown == (instruction.strip() if which == "byte" else instruction)
    assert instruction[rendered.instruction_shift:].startswith(shown)
    assert rendered.text[r0:r1] == response
    # Offsets map tokens back onto the text; instruction tokens spell out the instruction.
    pieces = "".join(rendered.text[max(a, i0):min(b, i1)] for a, b in
                     (rendered.offsets[t] for t in rendered.token_indices(rendered.instruction_span)))
    assert pieces.replace(" ", "") == shown.replace(" ", "")
    assert render_prompt(tokenizer, instruction) == rendered.text[:r0]


def test_template_that_rewrites_content_is_rejected(byte_tokenizer):
    tokenizer = byte_tokenizer.__class__(tokenizer_object=byte_tokenizer.backend_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot locate"):
        render_sample(tokenizer, "ann has 3", "3")


def test_cached_template_markup_is_rendered_again_when_it_goes_stale(byte_tokenizer):
    """The markup around the messages is cached per tokenizer. A template whose markup changes
    between calls (Llama 3's prints today's date; here the BOS token changes) is rendered
    again rather than refused, and a new template replaces the cached markup."""
    tokenizer = byte_tokenizer.__class__(tokenizer_object=byte_tokenizer.backend_tokenizer)
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tokenizer.bos_token = "<a>"
    assert render_sample(tokenizer, "ann has 3", "3").text == "<a>[ann has 3][3]"
    tokenizer.bos_token = "<b>"
    rendered = render_sample(tokenizer, "ann has 3", "3")
    assert rendered.text == "<b>[ann has 3][3]" and rendered.instruction_span == (4, 13)
    tokenizer.chat_template = "{% for m in messages %}({{ m['content'] }}){% endfor %}"
    assert render_sample(tokenizer, "ann has 3", "3").response_span == (12, 13)


def test_parquet_columns_json_cannot_hold_are_converted_and_an_unreadable_value_is_one_rows_error(tmp_path):
    """Real Parquet corpora carry timestamps, dates, decimals and bytes. They reach every stage as
    JSON (the store writes JSONL), and one value Python cannot hold costs its row, not the file."""
    import decimal

    rows = [good(1), good(2), good(3)]
    table = pa.Table.from_pylist(rows).append_column(
        "crawled", pa.array([1, 2, 3], pa.timestamp("ns"))).append_column(
        "published", pa.array([0, 2**31 - 1, 1], pa.date32())).append_column(  # row 2: past year 9999
        "price", pa.array([decimal.Decimal("1.50")] * 3, pa.decimal128(5, 2))).append_column(
        "blob", pa.array([b"\xff\x00", "caf\u00e9".encode(), b""])).append_column(
        "took", pa.array([90, 1, 2], pa.duration("s")))
    pq.write_table(table, tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.Table.from_pylist([good(4)]), tmp_path / "c.parquet")

    errors: list[RecordError] = []
    records = list(iter_records(tmp_path, errors))
    assert [r.id for r in records] == ["r1", "r3", "r4"]
    assert records[0].meta == {"crawled": "1970-01-01T00:00:00.000000001", "published": "1970-01-01",
                               "price": "1.50", "blob": "/wA=", "took": 90.0}
    assert records[1].meta["blob"] == "" and records[1].meta["published"] == "1970-01-02"
    json.dumps([r.to_dict() for r in records])  # every stage writes them
    assert all(isinstance(r.meta["price"], str) for r in records[:2])
    unreadable, broken = errors
    assert (unreadable.line, unreadable.source) == (2, str(tmp_path / "a.parquet"))
    assert unreadable.reason.startswith("column 'published' cannot be read")
    assert broken.source == str(tmp_path / "b.parquet") and "not a readable parquet file" in broken.reason

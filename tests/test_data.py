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
    assert reasons[(6, "r1")] == "duplicate id"
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

"""The teacher-logit cache's core (no Ray): rows built in length-sorted batches give the loss the
online teacher gives on the training batch, and a cache refuses what it was not built for.
The Ray Data job and a Ray Train run from the cache are in test_distill_job.py."""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from leaf_ray.config import DistillationConfig
from leaf_ray.data import Record
from leaf_ray.distillation.loop import branch_loss, encode_branch
from leaf_ray.distillation.losses import sparse_distill_loss, teacher_top_k
from leaf_ray.distillation.teacher_cache import (
    TeacherCache,
    TeacherCacheError,
    cache_rows,
    check_cache,
    tokenizer_fingerprint,
    write_cache,
)
from tests.conftest import tiny_llama

# Real text shapes: LaTeX, code, newlines, unicode; a response-level record learns only after its prefix.
RECORDS = [
    Record("latex", "Solve $\\frac{x}{2} = 3$.", "We get $x = 6$, so \\boxed{6}."),
    Record("code", "Fix:\n```python\ndef f(x):\n    return x+1\n```", "```python\ndef f(x):\n    return x + 1\n```"),
    Record("unicode", "naïve café, 東京 🙂 — how many?", "Step 1: count.\nStep 2: 7.", target_start=15),
    Record("short", "ann has 3 . ann gets 4 more .", "7"),
    Record("lines", "a\n\nb\n", "one\ntwo\nthree\n"),
]


def cache_of(folder, rows, tokenizer, vocab, temperature=1.0, teacher="teacher-fp"):
    k = len(rows[0]["ids"]) // rows[0]["positions"]
    return write_cache(folder, rows, {"teacher": teacher, "tokenizer": tokenizer_fingerprint(tokenizer), "k": k,
                                      "temperature": temperature, "vocab": vocab})


@pytest.fixture(scope="module")
def student(byte_tokenizer):
    return tiny_llama(len(byte_tokenizer), seed=5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_a_full_vocabulary_cache_gives_the_online_teachers_loss(tmp_path, byte_tokenizer, byte_model, student, kind):
    vocab = len(byte_tokenizer)
    # Batches of at most 160 padded tokens, sorted by length: other padding and order than the training batch.
    rows = cache_rows(byte_model, byte_tokenizer, RECORDS, k=vocab, temperature=1.5, vocab=vocab,
                      max_tokens_per_batch=160)
    cache = TeacherCache(cache_of(tmp_path / "cache", rows, byte_tokenizer, vocab, temperature=1.5))
    config = DistillationConfig(loss=kind, temperature=1.5, loss_chunk_tokens=7)
    batch = encode_branch(byte_tokenizer, RECORDS)
    online = branch_loss(student, byte_model, batch, config, vocab)
    cached = branch_loss(student, cache, batch, config, vocab)
    assert cached.requires_grad
    assert cached.item() == pytest.approx(online.item(), rel=2e-3)  # float16 log-probs


def test_a_top_k_cache_gives_the_sparse_loss_of_the_teachers_logits(tmp_path, byte_tokenizer, byte_model, student):
    vocab = len(byte_tokenizer)
    rows = cache_rows(byte_model, byte_tokenizer, RECORDS, k=8, temperature=1.0, vocab=vocab, max_tokens_per_batch=160)
    assert [row["positions"] * 8 for row in rows] == [len(row["ids"]) for row in rows]
    cache = TeacherCache(cache_of(tmp_path / "cache", rows, byte_tokenizer, vocab))
    part = pq.read_table(tmp_path / "cache" / "logits" / "part-0.parquet")
    assert part.schema.metadata[b"k"] == b"8"
    assert part.schema.field("ids").type.value_type == pa.int32()
    assert part.schema.field("logprobs").type.value_type == pa.float16()
    batch = encode_branch(byte_tokenizer, list(reversed(RECORDS)))
    with torch.no_grad():
        logits = byte_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = sparse_distill_loss(student_logits, teacher_top_k(logits, batch["target_mask"], 8), batch["target_mask"])
    got = sparse_distill_loss(student_logits, cache.targets(batch["records"]), batch["target_mask"])
    assert got.item() == pytest.approx(expected.item(), rel=2e-3)
    # The response-level record caches only the positions after its prefix.
    learned = int(encode_branch(byte_tokenizer, [RECORDS[2]])["target_mask"].sum())
    whole = int(encode_branch(byte_tokenizer, [replace(RECORDS[2], target_start=0)])["target_mask"].sum())
    assert cache.targets([RECORDS[2]]).ids.shape[0] == learned < whole


def test_a_cache_refuses_another_tokenizer_temperature_teacher_or_record(tmp_path, byte_tokenizer, metaspace_tokenizer,
                                                                        byte_model):
    vocab = len(byte_tokenizer)
    rows = cache_rows(byte_model, byte_tokenizer, RECORDS[:2], k=4, temperature=1.0, vocab=vocab)
    folder = cache_of(tmp_path / "cache", rows, byte_tokenizer, vocab, teacher="abc")
    check_cache(folder, byte_tokenizer, 1.0, "abc")
    check_cache(folder, byte_tokenizer, 1.0, None)  # the teacher is not on this node: the cache's record stands
    with pytest.raises(TeacherCacheError, match="tokenizer or chat template"):
        check_cache(folder, metaspace_tokenizer, 1.0)
    with pytest.raises(TeacherCacheError, match="distillation.temperature is 2.0"):
        check_cache(folder, byte_tokenizer, 2.0)
    with pytest.raises(TeacherCacheError, match="the teacher \\(xyz\\) is not the one"):
        check_cache(folder, byte_tokenizer, 1.0, "xyz")
    with pytest.raises(TeacherCacheError, match="'short' is not in the teacher cache"):
        TeacherCache(folder).targets([RECORDS[0], RECORDS[3]])
    (folder / "summary.json").unlink()  # a build that did not finish
    with pytest.raises(TeacherCacheError, match="no finished teacher cache"):
        TeacherCache(folder)


def test_a_cache_serves_targets_under_bf16_autocast(tmp_path, byte_tokenizer, byte_model, student):
    # Distillation autocasts to bf16 where the CPU has AVX512-BF16 (or on a GPU): the cached
    # float16 log-probs must come back as stored, not fail in torch.cat's autocast promotion.
    vocab = len(byte_tokenizer)
    rows = cache_rows(byte_model, byte_tokenizer, RECORDS, k=8, temperature=1.0, vocab=vocab)
    cache = TeacherCache(cache_of(tmp_path / "cache", rows, byte_tokenizer, vocab))
    plain = cache.targets(RECORDS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = cache.targets(RECORDS)
    assert autocast.logprobs.dtype == torch.float16
    assert torch.equal(autocast.ids, plain.ids) and torch.equal(autocast.logprobs, plain.logprobs)


def test_a_cache_in_many_parts_reads_only_what_a_batch_needs_and_gives_every_row(tmp_path, byte_tokenizer, byte_model):
    """One part per record, one row group decoded at a time: every record's targets are the rows
    written for it (read back here with plain pyarrow), in the batch's order; keys that share
    their first 64 bits, the index's, are still told apart."""
    vocab = len(byte_tokenizer)
    rows = cache_rows(byte_model, byte_tokenizer, RECORDS, k=8, temperature=1.0, vocab=vocab)
    twins = [{**rows[3], "key": "f" * 16 + "0" * 24}, {**rows[4], "key": "f" * 16 + "1" * 24}]
    folder = cache_of(tmp_path / "cache", rows[:1], byte_tokenizer, vocab)
    for number, row in enumerate(rows[1:] + twins, start=1):
        pq.write_table(pa.Table.from_pylist([row]), folder / "logits" / f"part-{number}.parquet")
    cache = TeacherCache(folder, row_groups_in_memory=1)
    assert len(cache) == len(rows) + 2 and len(cache.read_all()) == len(rows) + 2

    def written(key: str) -> tuple[list, list]:
        for path in sorted((folder / "logits").glob("*.parquet")):
            for row in pq.read_table(path).to_pylist():
                if row["key"] == key:
                    return row["ids"], row["logprobs"]
        raise KeyError(key)

    order = [RECORDS[i] for i in (4, 0, 2, 0, 3)]
    targets = cache.targets(order)
    at = 0
    for record in order:
        ids, logprobs = written(cache_rows(byte_model, byte_tokenizer, [record], 8, 1.0, vocab)[0]["key"])
        count = len(ids) // 8
        assert targets.ids[at:at + count].flatten().tolist() == ids
        assert targets.logprobs[at:at + count].flatten().tolist() == pytest.approx(logprobs)
        at += count
    assert at == targets.ids.shape[0]
    for twin in twins:
        assert cache.entry(twin["key"])[0].flatten().tolist() == written(twin["key"])[0]
    assert cache.entry("f" * 16 + "2" * 24) is None


def test_a_part_of_many_batches_is_decoded_a_row_group_at_a_time(tmp_path, byte_tokenizer, byte_model):
    """The job writes many batches to one part, a row group each; a worker decodes one row group
    at a time, not the part, and every record still gets the rows written for it."""
    vocab = len(byte_tokenizer)
    rows = cache_rows(byte_model, byte_tokenizer, RECORDS, k=8, temperature=1.0, vocab=vocab)
    folder = write_cache(tmp_path / "cache", rows, {"teacher": "t", "tokenizer": tokenizer_fingerprint(byte_tokenizer),
                                                    "k": 8, "temperature": 1.0, "vocab": vocab},
                         records_per_row_group=2)
    assert pq.ParquetFile(folder / "logits" / "part-0.parquet").num_row_groups == 3
    cache = TeacherCache(folder, row_groups_in_memory=1)
    for row in reversed(rows):
        ids, logprobs, tail = cache.entry(row["key"])
        assert ids.flatten().tolist() == row["ids"].tolist() and torch.equal(logprobs.flatten(),
                                                                            torch.from_numpy(row["logprobs"]))
        assert tail.tolist() == row["tail"].tolist()
        # What is held is one row group (at most 2 records), not the part's 5.
        assert len(cache._decoded) == 1 and len(next(iter(cache._decoded.values()))) <= 2

"""The optional verification stage: keep rules (pure), and vLLM answers through Ray Data's
LLM processor on a real local cluster, checked against transformers greedy decoding."""

from __future__ import annotations

import json

import pytest

from leaf_ray.config import PipelineConfig, ResourcesConfig, ScoringConfig, VerificationConfig
from leaf_ray.data import Record, TrainingPair, write_jsonl
from leaf_ray.detection.store import read_originals, read_training_set, training_set_parts
from leaf_ray.detection.verification import generation_requests, select
from tests.conftest import EMBEDDED, KV_CACHE_BYTES

PAIRS = [TrainingPair(Record("a", "qa", "1", "1"), [Record("a#cf0", "qa'", "1", "1"), Record("a#cf1", "qa''", "1", "1")]),
         TrainingPair(Record("b", "qb", "2", "2"), [Record("b#cf0", "qb'", "2", "2")]),
         TrainingPair(Record("c", "qc", "3", "3"))]
TEACHER = {"a": "1", "b": "2", "c": "7"}
STUDENT = {"a": "5", "b": "2", "c": "3", "a#cf0": "1", "a#cf1": "4", "b#cf0": "2"}


def kept(selection) -> tuple[list[str], list[str]]:
    return [p.original.id for p in selection.pairs], [c.id for p in selection.pairs for c in p.counterfactuals]


def test_default_rules_keep_teacher_right_student_wrong_and_fixing_counterfactuals():
    chosen = select(PAIRS, STUDENT, TEACHER, VerificationConfig())
    assert kept(chosen) == (["a"], ["a#cf0"])
    assert chosen.summary["teacher_accuracy_original"] == pytest.approx(2 / 3)
    assert chosen.summary["student_accuracy_counterfactual"] == pytest.approx(2 / 3)


def test_other_rules():
    loose = select(PAIRS, STUDENT, TEACHER, VerificationConfig(keep_originals="teacher_right", keep_counterfactuals="all"))
    assert kept(loose) == (["a", "b"], ["a#cf0", "a#cf1", "b#cf0"])
    everything = select(PAIRS, STUDENT, {}, VerificationConfig(keep_originals="all"))
    assert kept(everything) == (["a", "b", "c"], ["a#cf0", "b#cf0"])


def test_requests_need_answers():
    assert len(generation_requests(PAIRS)) == 6
    with pytest.raises(ValueError, match="answer"):
        generation_requests([TrainingPair(Record("x", "q", "r"))])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")
def test_vllm_answers_match_transformers_and_rules_apply(tmp_path):
    import ray

    from leaf_ray.distributed.scoring import run_scoring
    from leaf_ray.distributed.verify import run_verification
    from leaf_ray.checkers import CHECKERS
    from leaf_ray.evaluation import greedy_generate
    from leaf_ray.models import load_model

    lines = (EMBEDDED / "data" / "simple" / "distill.jsonl").read_text().splitlines()[:24]
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [json.loads(line) for line in lines])
    pipeline = PipelineConfig(
        run_dir=str(tmp_path), teacher=str(EMBEDDED / "teacher"), student=str(EMBEDDED / "student"),
        # parts of 8 records: verification joins each part's pairs with that part's answers
        scoring=ScoringConfig(corpus=str(corpus), max_length=128, records_per_part=8,
                              resources=ResourcesConfig(num_cpus=1)),
        # enforce_eager: no kernel compilation at each engine's cold start (answers, not speed, are tested)
        verification=VerificationConfig(max_tokens=8, max_model_len=256, dtype="float32", batch_size=32,
                                        enforce_eager=True, kv_cache_memory_bytes=KV_CACHE_BYTES))
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        run_scoring(pipeline)
        summary = run_verification(pipeline)
    finally:
        ray.shutdown()

    out = pipeline.layout.verify
    answers = {row["key"]: row for path in sorted((out / "answers").glob("part-*"))
               for row in map(json.loads, path.read_text().splitlines())}
    originals = read_originals(pipeline.layout.score)
    assert len(originals) == 24
    assert summary["parts"] == len(training_set_parts(pipeline.layout.score)) >= 2
    assert summary["engines_side_by_side"]  # 4 CPUs hold both engines and their tokenizers
    assert sorted(answers) == sorted(request["key"] for request in generation_requests(read_training_set(pipeline.layout.score)))
    student, tokenizer = load_model(EMBEDDED / "student")
    teacher, _ = load_model(EMBEDDED / "teacher")
    instructions = [r.instruction for r in originals]
    # The same greedy decoding in transformers (the reference) gives the same answers.
    assert [answers[r.id]["student"] for r in originals] == greedy_generate(student, tokenizer, instructions)
    assert [answers[r.id]["teacher"] for r in originals] == greedy_generate(teacher, tokenizer, instructions)

    check = CHECKERS["number"]
    kept_pairs = read_training_set(out)
    kept_ids = [p.original.id for p in kept_pairs]
    assert kept_ids == [r.id for r in originals if check(answers[r.id]["teacher"], r.answer)
                        and not check(answers[r.id]["student"], r.answer)]
    assert summary["kept_originals"] == len(kept_ids) > 0
    for pair in kept_pairs:
        for cf in pair.counterfactuals:
            assert check(answers[cf.id]["student"], cf.answer)

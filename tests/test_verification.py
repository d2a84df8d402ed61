"""The optional verification stage: keep rules (pure), and vLLM answers through Ray Data's
LLM processor on a real local cluster, checked against transformers greedy decoding."""

from __future__ import annotations

import json

import pytest

from leaf_ray.config import PipelineConfig, ScoringConfig, VerificationConfig
from leaf_ray.data import Record, iter_records, write_jsonl
from leaf_ray.verification import generation_requests, select
from tests.conftest import EMBEDDED

ORIGINALS = [Record("a", "qa", "1", "1"), Record("b", "qb", "2", "2"), Record("c", "qc", "3", "3")]
CFS = [{"id": "a#cf0", "source_id": "a", "instruction": "qa'", "response": "1", "answer": "1"},
       {"id": "a#cf1", "source_id": "a", "instruction": "qa''", "response": "1", "answer": "1"},
       {"id": "b#cf0", "source_id": "b", "instruction": "qb'", "response": "2", "answer": "2"}]
TEACHER = {"a": "1", "b": "2", "c": "7"}
STUDENT = {"a": "5", "b": "2", "c": "3", "a#cf0": "1", "a#cf1": "4", "b#cf0": "2"}


def config(**update) -> VerificationConfig:
    return VerificationConfig(data_dir="d", **update)


def test_default_rules_keep_teacher_right_student_wrong_and_fixing_counterfactuals():
    chosen = select(ORIGINALS, CFS, STUDENT, TEACHER, config())
    assert [r.id for r in chosen.originals] == ["a"]
    assert [c["id"] for c in chosen.counterfactuals] == ["a#cf0"]
    assert chosen.summary["teacher_accuracy_original"] == pytest.approx(2 / 3)
    assert chosen.summary["student_accuracy_counterfactual"] == pytest.approx(2 / 3)


def test_other_rules():
    loose = select(ORIGINALS, CFS, STUDENT, TEACHER, config(keep_originals="teacher_right", keep_counterfactuals="all"))
    assert [r.id for r in loose.originals] == ["a", "b"] and len(loose.counterfactuals) == 3
    everything = select(ORIGINALS, CFS, STUDENT, {}, config(keep_originals="all"))
    assert len(everything.originals) == 3 and [c["id"] for c in everything.counterfactuals] == ["a#cf0", "b#cf0"]


def test_requests_need_answers():
    assert len(generation_requests(ORIGINALS, CFS)) == 6
    with pytest.raises(ValueError, match="answer"):
        generation_requests([Record("x", "q", "r")], [])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")
def test_vllm_answers_match_transformers_and_rules_apply(tmp_path):
    import ray

    from leaf_ray.demo import score_corpus
    from leaf_ray.detection import PairScorer, load_model
    from leaf_ray.distributed.verify import run_verification
    from leaf_ray.evaluation import CHECKERS, greedy_generate

    lines = (EMBEDDED / "data" / "simple" / "distill.jsonl").read_text().splitlines()[:24]
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [json.loads(line) for line in lines])
    pipeline = PipelineConfig(
        scoring=ScoringConfig(teacher=str(EMBEDDED / "teacher"), student=str(EMBEDDED / "student"), corpus=str(corpus),
                              output_dir=str(tmp_path / "score"), max_length=128),
        verification=VerificationConfig(data_dir=str(tmp_path / "score"), output_dir=str(tmp_path / "verify"),
                                        max_tokens=8, max_model_len=256, dtype="float32", batch_size=32))
    score_corpus(PairScorer.from_config(pipeline.scoring), pipeline)
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        summary = run_verification(pipeline)
    finally:
        ray.shutdown()

    out = tmp_path / "verify"
    answers = {row["key"]: row for row in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    originals = list(iter_records(corpus))
    student, tokenizer = load_model(EMBEDDED / "student")
    teacher, _ = load_model(EMBEDDED / "teacher")
    instructions = [r.instruction for r in originals]
    # The same greedy decoding in transformers (the reference) gives the same answers.
    assert [answers[r.id]["student"] for r in originals] == greedy_generate(student, tokenizer, instructions)
    assert [answers[r.id]["teacher"] for r in originals] == greedy_generate(teacher, tokenizer, instructions)

    check = CHECKERS["number"]
    kept = [r.id for r in iter_records(out / "originals.jsonl")]
    assert kept == [r.id for r in originals if check(answers[r.id]["teacher"], r.answer)
                    and not check(answers[r.id]["student"], r.answer)]
    assert summary["kept_originals"] == len(kept) > 0
    for line in (out / "counterfactuals.jsonl").read_text().splitlines():
        cf = json.loads(line)
        assert cf["source_id"] in kept and check(answers[cf["id"]]["student"], cf["answer"])

"""Response-level LeaF: the pruned reasoning prefix is context, the steps after it are learned.

Each behaviour is checked against a slow reference that renders the chat with the
tokenizer's own template and walks tokens one by one, without the code under test
(``render_sample``, ``encode_for_training``, ``greedy_generate``).
"""

from __future__ import annotations

import math

import pytest
import torch

from leaf_ray.config import DistillationConfig, PruningConfig, ScoringConfig
from leaf_ray.data import Record, TrainingPair
from leaf_ray.detection.scorer import PairScorer, ScoringBatchProcessor
from leaf_ray.detection.store import pair_to_row, read_training_set, row_to_pair, write_training_set
from leaf_ray.detection.verification import generation_requests
from leaf_ray.distillation.loop import branch_loss
from leaf_ray.data import encode_for_training
from leaf_ray.evaluation import greedy_generate
from tests.conftest import tiny_llama

RECORDS = [
    Record("r0", "ann has 3 . ann gets 4 more . note : 9 is lucky . how many ?",
           "ann has 3 .\nnote says 9 .\nann gets 4 more .\n3 + 4 = 7 .\n#### 7", "7"),
    Record("r1", "bob has 1 . bob gets 8 more . how many ?",
           "bob has 1 .\nthe bus left at 5 .\nbob gets 8 more .\n1 + 8 = 9 .\n#### 9", "9"),
    Record("r2", "sue has 6 . sue gets 2 more . note : 7 is lucky . how many ?",
           "sue has 6 .\nnote : 7 is lucky .\nsue gets 2 more .\n6 + 2 = 8 .\n#### 8", "8"),
]


def scored_pairs(byte_tokenizer, tmp_path, level: str) -> list[TrainingPair]:
    teacher, student = tiny_llama(len(byte_tokenizer), seed=3), tiny_llama(len(byte_tokenizer), seed=4)
    scorer = PairScorer(teacher, byte_tokenizer, student, byte_tokenizer,
                        ScoringConfig(corpus="unused", level=level, prefix_fraction=0.5))
    out = tmp_path / level
    ScoringBatchProcessor(scorer, PruningConfig(quantile=0.3), out)([r.id for r in RECORDS], RECORDS)
    (out / "summary.json").write_text("{}")
    return read_training_set(out)


def test_a_response_level_pair_learns_only_the_steps_after_its_prefix(byte_tokenizer, tmp_path):
    pairs = scored_pairs(byte_tokenizer, tmp_path, "response")
    assert [p.level for p in pairs] == ["response"] * 3 and sum(len(p.counterfactuals) for p in pairs) > 0
    for pair, record in zip(pairs, RECORDS):
        prefix_end = len("\n".join(record.response.split("\n")[:2])) + 1  # 5 steps, half of them: 2 lines
        assert pair.original.target_start == prefix_end
        continuation = record.response[prefix_end:]
        for cf in pair.counterfactuals:
            assert cf.response[cf.target_start:] == continuation  # the steps after the prefix are untouched
            assert cf.prefix != pair.original.prefix and cf.instruction == record.instruction
            assert cf.id.startswith(f"{record.id}#rcf")


def test_both_levels_of_one_record_travel_as_separate_pairs(byte_tokenizer, tmp_path):
    """Written into one training set (as leaf_instr_resp's), read back, and sent to Ray Train
    workers as rows: each pair keeps its level, its prefix and its own counterfactuals."""
    pairs = scored_pairs(byte_tokenizer, tmp_path, "instruction") + scored_pairs(byte_tokenizer, tmp_path, "response")
    write_training_set(tmp_path / "both", pairs, {})
    back = read_training_set(tmp_path / "both")
    key = lambda p: (p.original.id, p.level)  # noqa: E731
    assert sorted(map(key, back)) == sorted(map(key, pairs)) and len(back) == 6
    by_key = {key(p): p for p in pairs}
    for pair in back:
        assert pair == by_key[key(pair)]
        assert row_to_pair(pair_to_row(pair)) == pair


# --------------------------------------------------------------------------- the loss, slowly

def reference_target_positions(tokenizer, record: Record) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered chat and, per token, whether it is learned: it ends after the
    start of the learned part (``response[target_start:]``, then the closing markup)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": record.instruction},
                                          {"role": "assistant", "content": record.response}], tokenize=False)
    response_at = text.index(record.response, text.index(record.instruction) + len(record.instruction))
    boundary = response_at + record.target_start
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], [end > boundary and end > start for start, end in encoded["offset_mapping"]]


def reference_forward_kl(student, teacher, tokenizer, records: list[Record]) -> float:
    """Mean KL(p_T || p_S) over learned tokens, one sequence and one position at a time."""
    terms = []
    for record in records:
        ids, learned = reference_target_positions(tokenizer, record)
        with torch.no_grad():
            s_logits = student(torch.tensor([ids])).logits[0].double()
            t_logits = teacher(torch.tensor([ids])).logits[0].double()
        for t in range(1, len(ids)):
            if learned[t]:
                p_t, p_s = torch.softmax(t_logits[t - 1], -1), torch.softmax(s_logits[t - 1], -1)
                terms.append(float((p_t * (p_t / p_s).log()).sum()))
    return sum(terms) / len(terms)


def test_the_loss_covers_the_continuation_for_original_and_counterfactual_alike(byte_tokenizer, tmp_path):
    pairs = scored_pairs(byte_tokenizer, tmp_path, "response")
    records = [r for p in pairs for r in (p.original, *p.counterfactuals)]
    assert any(r.target_start for r in records)
    student, teacher = tiny_llama(len(byte_tokenizer), seed=5), tiny_llama(len(byte_tokenizer), seed=6)
    config = DistillationConfig(loss="forward_kl", bf16_autocast=False)
    got = branch_loss(student, teacher, encode_for_training(byte_tokenizer, records), config,
                      len(byte_tokenizer)).item()
    assert math.isclose(got, reference_forward_kl(student, teacher, byte_tokenizer, records), rel_tol=1e-4)
    # And the learned tokens are the continuation: the same text for a pair's original and its counterfactuals.
    for pair in pairs:
        learned_text = set()
        for record in (pair.original, *pair.counterfactuals):
            ids, learned = reference_target_positions(byte_tokenizer, record)
            learned_text.add(byte_tokenizer.decode([i for i, keep in zip(ids, learned) if keep]))
        assert len(learned_text) == 1
        assert next(iter(learned_text)).startswith(pair.original.response[pair.original.target_start:])


# --------------------------------------------------------------------------- verification, slowly

def reference_greedy(model, tokenizer, instruction: str, prefix: str, max_new_tokens: int) -> str:
    """Greedy decoding one token at a time, the whole sequence re-run at each step."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                           add_generation_prompt=True) + prefix
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            next_id = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if next_id == tokenizer.eos_token_id:
            break
        new.append(next_id)
    whole = tokenizer.decode(ids + new, skip_special_tokens=True)
    return whole[len(tokenizer.decode(ids, skip_special_tokens=True)):]


def test_verification_continues_from_the_pruned_prefix(byte_tokenizer, tmp_path):
    pairs = scored_pairs(byte_tokenizer, tmp_path, "response")
    requests = {row["key"]: row for row in generation_requests(pairs)}
    for pair in pairs:
        assert requests[f"{pair.original.id}@response"]["prefix"] == pair.original.prefix
        for cf in pair.counterfactuals:
            assert requests[cf.id]["prefix"] == cf.prefix == cf.response[:cf.target_start]
    model = tiny_llama(len(byte_tokenizer), seed=7)
    rows = list(requests.values())
    got = greedy_generate(model, byte_tokenizer, [r["instruction"] for r in rows], max_new_tokens=6,
                          prefixes=[r["prefix"] for r in rows])
    want = [reference_greedy(model, byte_tokenizer, r["instruction"], r["prefix"], 6) for r in rows]
    assert got == want
    # From the unchanged instruction alone, every counterfactual would get the original's answer.
    alone = greedy_generate(model, byte_tokenizer, [r["instruction"] for r in rows], max_new_tokens=6)
    assert alone != got


@pytest.mark.ray
def test_the_pipeline_joins_both_levels_and_refuses_a_corpus_without_reasoning(byte_tokenizer, tmp_path):
    """leaf_instr_resp's training set is the instruction pairs plus the response-level pass's; a
    pass that kept nothing (single-step responses) is an error naming the variant, not a silent
    copy of leaf. The join is a Ray Data group-by, so this test starts a local cluster and stops
    it: one left running in the test process dies with a later test's `ray stop`, and takes the
    test process with it."""
    import ray

    from leaf_ray.config import PipelineConfig
    from leaf_ray.distributed.pipeline import training_set

    config = PipelineConfig.model_validate({"run_dir": str(tmp_path / "run"), "teacher": "t", "student": "s",
                                            "scoring": {"corpus": "c.jsonl"}, "distillation": {}})
    layout = config.layout
    write_training_set(layout.score, scored_pairs(byte_tokenizer, tmp_path, "instruction"), {})
    write_training_set(layout.score_response, [], {})
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with pytest.raises(ValueError, match="leaf_instr_resp: the response-level pass kept no record"):
            training_set(config, "leaf_instr_resp")
        write_training_set(layout.score_response, scored_pairs(byte_tokenizer, tmp_path, "response"), {})
        folder = training_set(config, "leaf_instr_resp")
    finally:
        ray.shutdown()
    assert sorted(p.level for p in read_training_set(folder)) == ["instruction"] * 3 + ["response"] * 3
    assert training_set(config, "leaf") == layout.score

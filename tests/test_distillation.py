"""The LeaF distillation core: the hybrid objective, batching, the one training loop, variants."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from leaf_ray.config import DistillationConfig
from leaf_ray.data import Record, TrainingPair
from leaf_ray.data import encode_for_training as encode_records
from leaf_ray.detection.store import read_training_set
from leaf_ray.distillation.loop import (
    accumulate_gradients,
    branch_loss,
    hybrid_loss,
    sample_batch,
    split_validation,
    train,
)
from leaf_ray.distillation.variants import VARIANTS, variant_config
from leaf_ray.distillation.losses import distill_loss
from leaf_ray.detection.pruning import find_spans, mask_of_spans, random_mask_like
from leaf_ray.detection.sensitivity import UnitScores
from leaf_ray.detection.units import split_units
from tests.conftest import tiny_llama

ORIGINALS = [Record(f"r{i}", f"ann has {i} . note : {i + 3} is lucky . how many ?", str(i + 3)) for i in range(6)]
CFS = [{"id": f"r{i}#cf0", "source_id": f"r{i}", "instruction": f"ann has {i} . how many ?", "response": str(i + 3)}
       for i in range(0, 6, 2)]


def config(**update) -> DistillationConfig:
    settings = {"batch_size": 4, "max_steps": 30, "learning_rate": 3e-3, "eval_every": 10, "bf16_autocast": False}
    return DistillationConfig(**{**settings, **update})


def pair_records(originals, counterfactuals) -> list[TrainingPair]:
    """The reference join: each original with the counterfactual rows whose source_id names it."""
    return [TrainingPair(o, [Record.from_dict(c) for c in counterfactuals if c["source_id"] == o.id])
            for o in originals]


def test_a_training_set_joins_counterfactuals_by_source_id(tmp_path):
    # The store's format, written by hand: parts in any order, counterfactuals apart from originals.
    (tmp_path / "originals").mkdir()
    (tmp_path / "counterfactuals").mkdir()
    for name, rows in (("a", ORIGINALS[3:]), ("b", ORIGINALS[:3])):
        (tmp_path / "originals" / f"part-{name}.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    (tmp_path / "counterfactuals" / "part-a.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CFS))
    (tmp_path / "summary.json").write_text("{}")
    pairs = read_training_set(tmp_path)
    assert [p.original.id for p in pairs] == [f"r{i}" for i in range(6)]
    assert [len(p.counterfactuals) for p in pairs] == [1, 0, 1, 0, 1, 0]
    assert pairs[2].counterfactuals[0].instruction == "ann has 2 . how many ?"
    assert pairs == pair_records(ORIGINALS, CFS)


def test_kd_variants_train_with_lam_one_and_say_so():
    assert VARIANTS["kd"].lam == 1.0 and VARIANTS["leaf"].lam is None
    kd, changes = variant_config(config(lam=0.5), "kd")
    assert kd.lam == 1.0 and kd.variant == "kd" and changes == ["lam: 0.5 -> 1.0"]
    matched, changes = variant_config(config(lam=0.5, batch_size=4), "kd_compute_matched")
    assert (matched.lam, matched.batch_size) == (1.0, 8) and changes == ["lam: 0.5 -> 1.0", "batch_size: 4 -> 8"]
    leaf, changes = variant_config(config(lam=0.3), "leaf")
    assert leaf.lam == 0.3 and changes == []
    # lam unset: the variant decides, nothing to contradict.
    assert variant_config(DistillationConfig(variant="kd"), "kd")[0].lam == 1.0
    with pytest.raises(ValueError, match="distillation.lam: variant 'kd' trains with lam = 1.0"):
        variant_config(DistillationConfig(variant="kd", lam=0.5), "kd")


def test_batches_follow_the_mode():
    pairs = pair_records(ORIGINALS, CFS)
    originals, cfs = sample_batch(pairs, config(lam=0.5), 64, random.Random(0))
    for o, c in zip(originals, cfs):  # a pair without counterfactuals falls back to its original
        assert c.id.startswith(o.id) and (c is o or c.id == f"{o.id}#cf0")
    assert sample_batch(pairs, config(lam=1.0), 64, random.Random(0))[1] is None
    mixed, none = sample_batch(pairs, config(mode="mixed"), 64, random.Random(0))
    assert none is None and {r.id for r in mixed} == {r.id for r in ORIGINALS} | {c["id"] for c in CFS}


def test_hybrid_loss_is_the_weighted_sum_of_branches(byte_tokenizer):
    teacher, student = tiny_llama(len(byte_tokenizer), seed=5), tiny_llama(len(byte_tokenizer), seed=6)
    pairs = pair_records(ORIGINALS, CFS)
    originals = encode_records(byte_tokenizer, [p.original for p in pairs])
    cfs = encode_records(byte_tokenizer, [p.counterfactuals[0] if p.counterfactuals else p.original for p in pairs])
    vocab = len(byte_tokenizer)
    with torch.no_grad():
        expected = []
        for batch in (originals, cfs):
            s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            expected.append(distill_loss(s, t, batch["target_mask"], chunk_tokens=None).item())
        total, parts = hybrid_loss(student, teacher, originals, cfs, config(lam=0.25), vocab)
    assert parts["loss_original"] == pytest.approx(expected[0], rel=1e-5)
    assert parts["loss_counterfactual"] == pytest.approx(expected[1], rel=1e-5)
    assert total.item() == pytest.approx(0.25 * expected[0] + 0.75 * expected[1], rel=1e-5)
    assert branch_loss(student, teacher, originals, config(), vocab).requires_grad


@pytest.mark.parametrize("update", [{"lam": 0.5}, {"lam": 1.0}, {"mode": "mixed"}, {"lam": 0.5, "grad_accum": 2}])
def test_short_run_moves_the_student_towards_the_teacher(byte_tokenizer, update):
    teacher = tiny_llama(len(byte_tokenizer), seed=7).requires_grad_(False)
    student = tiny_llama(len(byte_tokenizer), seed=8)
    pairs = pair_records(ORIGINALS, CFS)
    batch = encode_records(byte_tokenizer, [p.original for p in pairs])

    def held_out() -> float:
        with torch.no_grad():
            return branch_loss(student, teacher, batch, config(), len(byte_tokenizer)).item()

    kl = {}

    def report(metrics, state):
        assert state["step"] == metrics["step"] and state["optimizer"] is not None
        if metrics["step"] % 10 == 0:
            kl[metrics["step"]] = held_out()

    before = held_out()
    history = train(student, teacher, byte_tokenizer, pairs, config(**update), len(byte_tokenizer), report=report)
    assert [h["step"] for h in history] == list(range(1, 31)) and list(kl) == [10, 20, 30]
    assert kl[30] < 0.5 * before


def test_a_resumed_run_continues_where_it_stopped_and_matches_an_unbroken_one(byte_tokenizer):
    """Stop after 12 of 24 steps, resume from the reported state: the result is the unbroken run's."""
    teacher = tiny_llama(len(byte_tokenizer), seed=7).requires_grad_(False)
    pairs = pair_records(ORIGINALS, CFS)
    settings = config(lam=0.5, max_steps=24)

    unbroken = tiny_llama(len(byte_tokenizer), seed=8)
    train(unbroken, teacher, byte_tokenizer, pairs, settings, len(byte_tokenizer))

    first = tiny_llama(len(byte_tokenizer), seed=8)
    saved = {}

    def stop_at_12(metrics, state):
        if metrics["step"] == 12:
            saved.update(weights={k: v.clone() for k, v in first.state_dict().items()},
                         optimizer=state["optimizer"].state_dict(), schedule=state["schedule"].state_dict(), step=12)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(first, teacher, byte_tokenizer, pairs, settings, len(byte_tokenizer), report=stop_at_12)
    resumed = tiny_llama(len(byte_tokenizer), seed=99)  # different init: everything must come from the state
    resumed.load_state_dict(saved.pop("weights"))
    history = train(resumed, teacher, byte_tokenizer, pairs, settings, len(byte_tokenizer), resume=saved)
    assert [h["step"] for h in history] == list(range(13, 25))  # it did not start over
    for name, value in unbroken.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-4, atol=1e-6)


def test_validation_split_is_stable_and_disjoint():
    pairs = [TrainingPair(Record(f"id-{i}", "q", "a")) for i in range(400)]
    train, validation = split_validation(pairs, 0.1, limit=1000)
    assert 20 <= len(validation) <= 60 and len(train) + len(validation) == 400
    assert not {p.original.id for p in train} & {p.original.id for p in validation}
    more = pairs + [TrainingPair(Record(f"new-{i}", "q", "a")) for i in range(100)]
    _, grown = split_validation(more, 0.1, limit=1000)  # new records never move old ones
    assert {p.original.id for p in validation} <= {p.original.id for p in grown}
    assert len(split_validation(pairs, 0.1, limit=5)[1]) == 5


def test_accumulated_micro_batches_give_the_full_batch_gradient(byte_tokenizer):
    """Every record has a one-character answer, so each micro-batch mean weighs tokens equally
    and the accumulated gradient must equal the full batch's (the naive reference)."""
    teacher = tiny_llama(len(byte_tokenizer), seed=9).requires_grad_(False)
    student = tiny_llama(len(byte_tokenizer), seed=10)
    pairs = pair_records(ORIGINALS, CFS)
    originals = [p.original for p in pairs][:4]
    cfs = [p.counterfactuals[0] if p.counterfactuals else p.original for p in pairs][:4]
    vocab = len(byte_tokenizer)
    loss, _ = hybrid_loss(student, teacher, encode_records(byte_tokenizer, originals),
                          encode_records(byte_tokenizer, cfs), config(lam=0.3), vocab)
    loss.backward()
    reference = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)
    accumulated, _ = accumulate_gradients(student, teacher, byte_tokenizer, originals, cfs,
                                          config(lam=0.3, grad_accum=2), vocab)
    assert accumulated == pytest.approx(loss.item(), rel=1e-5)
    for p, expected in zip(student.parameters(), reference):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)


def test_control_masks():
    text = "ann has 3 . note : 7 is lucky . how many ?"
    units = split_units(text)
    diff = np.array([np.nan if u.is_space else 0.5 for u in units])
    scores = UnitScores(text, units, diff, diff, diff)
    oracle = mask_of_spans(scores, [(12, 31)])  # "note : 7 is lucky ."
    assert "".join(u.text for u, m in zip(units, oracle) if m) == "note:7islucky."
    detected = np.array([u.text in ("7", "how", "many") for u in units])
    for seed in range(20):
        control = random_mask_like(scores, detected, np.random.default_rng(seed))
        assert not any(m and u.is_space for u, m in zip(units, control))
        # One random span per detected span, of the same width; random spans may touch or overlap.
        assert 2 <= control.sum() <= 3 and len(find_spans(scores, control)) <= 2


def test_validation_runs_each_epoch_unless_told_otherwise():
    assert config(eval_every=None, batch_size=4).validation_interval(num_pairs=30) == 7
    assert config(eval_every=None, batch_size=64).validation_interval(num_pairs=30) == 1
    assert config(eval_every=5).validation_interval(num_pairs=30) == 5

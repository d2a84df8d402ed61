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
    PairStream,
    accumulate_gradients,
    branch_loss,
    buffer_shuffled,
    hybrid_loss,
    sample_batch,
    split_validation,
    streamed_batches,
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
    # The store's format, written by hand: parts in any order, each part's counterfactuals
    # beside its originals, in another order.
    (tmp_path / "originals").mkdir()
    (tmp_path / "counterfactuals").mkdir()
    for name, rows in (("a", ORIGINALS[3:]), ("b", ORIGINALS[:3])):
        (tmp_path / "originals" / f"part-{name}.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows))
        ids = {r.id for r in rows}
        (tmp_path / "counterfactuals" / f"part-{name}.jsonl").write_text(
            "".join(json.dumps(c) + "\n" for c in reversed(CFS) if c["source_id"] in ids))
    (tmp_path / "summary.json").write_text("{}")
    pairs = read_training_set(tmp_path)
    assert [p.original.id for p in pairs] == [f"r{i}" for i in range(6)]
    assert [len(p.counterfactuals) for p in pairs] == [1, 0, 1, 0, 1, 0]
    assert pairs[2].counterfactuals[0].instruction == "ann has 2 . how many ?"
    assert pairs == pair_records(ORIGINALS, CFS)

    # A counterfactual filed in another part than its original would be lost: refused, named.
    (tmp_path / "counterfactuals" / "part-a.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CFS))
    with pytest.raises(ValueError, match=r"part-a.jsonl: counterfactuals of \[\('r0', 'instruction'\)"):
        read_training_set(tmp_path)


def test_a_written_training_set_reads_back_in_parts_and_its_manifest_tells_sets_apart(tmp_path, monkeypatch):
    """Written in parts of PAIRS_PER_PART (3 here), read back whole or part by part; the
    manifest's digest changes with any pair and not with a rewrite of the same pairs."""
    import leaf_ray.detection.store as store

    monkeypatch.setattr(store, "PAIRS_PER_PART", 3)
    pairs = pair_records(ORIGINALS[:5], CFS)
    store.write_training_set(tmp_path / "set", iter(pairs), {"pairs": 5})
    assert store.training_set_parts(tmp_path / "set") == ["part-00000", "part-00001"]
    assert [len(store.read_part_pairs(tmp_path / "set", part)) for part in ("part-00000", "part-00001")] == [3, 2]
    assert read_training_set(tmp_path / "set") == pairs
    manifest = store.training_set_manifest(tmp_path / "set")
    assert manifest["pairs"] == 5 and len(manifest["files"]) == 4

    store.write_training_set(tmp_path / "set", pairs, {"pairs": 5})
    assert store.training_set_manifest(tmp_path / "set") == manifest
    store.write_training_set(tmp_path / "set", pairs[:2], {"pairs": 2})  # fewer parts: the old second one goes
    assert store.training_set_parts(tmp_path / "set") == ["part-00000"]
    assert store.training_set_manifest(tmp_path / "set")["digest"] != manifest["digest"]
    changed = [TrainingPair(Record(p.original.id, p.original.instruction + " !", p.original.response), p.counterfactuals)
               for p in pairs]
    store.write_training_set(tmp_path / "set", changed, {"pairs": 5})
    assert store.training_set_manifest(tmp_path / "set")["digest"] != manifest["digest"]


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


@pytest.mark.parametrize("source", ["held", "streamed"])
def test_a_resumed_run_continues_where_it_stopped_and_matches_an_unbroken_one(byte_tokenizer, source):
    """Stop after 12 of 24 steps, resume from the reported state: the result is the unbroken run's,
    with pairs held in memory and with pairs streamed in epochs."""
    teacher = tiny_llama(len(byte_tokenizer), seed=7).requires_grad_(False)
    held = pair_records(ORIGINALS, CFS)
    pairs = held if source == "held" else PairStream(lambda: iter(held), len(held))
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


def test_a_buffer_shuffle_is_a_permutation_that_mixes_only_as_far_as_its_buffer():
    items = list(range(50))
    for buffer in (1, 7, 50, 80):
        order = list(buffer_shuffled(iter(items), buffer, random.Random(3)))
        assert sorted(order) == items
        # An item leaves the buffer only after `buffer` later ones came in (or at the end).
        assert all(position >= item - buffer + 1 for position, item in enumerate(order)), buffer
    assert list(buffer_shuffled(iter(items), 1, random.Random(3))) == items
    assert list(buffer_shuffled(iter(items), 50, random.Random(3))) != items


def test_streamed_batches_split_an_epoch_over_ranks_reorder_each_epoch_and_resume_exactly():
    pairs = [TrainingPair(Record(f"r{i:02d}", f"q{i}", "a"), [Record(f"r{i:02d}#cf{k}", "q", "a") for k in range(3)])
             for i in range(23)]
    stream = PairStream(lambda: iter(pairs), len(pairs))
    settings = config(lam=0.5, shuffle_buffer=8)

    def steps(rank: int, world: int, count: int, start: int = 0) -> list:
        batches = streamed_batches(stream, settings, 3, rank, world, start)
        return [next(batches) for _ in range(count)]

    # 2 ranks: rank r keeps pairs r, r+2, ...: 12 and 11 pairs, so 4 and 3 batches of 3 an epoch.
    for rank, per_epoch in ((0, 4), (1, 3)):
        epochs = steps(rank, 2, 2 * per_epoch)
        first, second = ([o.id for originals, _ in epochs[e * per_epoch:(e + 1) * per_epoch] for o in originals]
                         for e in (0, 1))
        mine = {p.original.id for p in pairs[rank::2]}
        assert len(set(first)) == len(first) == 3 * per_epoch and set(first) <= mine
        assert first != second  # a new order each epoch
        for originals, counterfactuals in epochs:
            assert [c.id.split("#")[0] for c in counterfactuals] == [o.id for o in originals]
    # The same seed gives the same batches; a resumed source goes on with the unbroken one's.
    assert steps(0, 2, 10) == steps(0, 2, 10)
    assert steps(0, 2, 10)[6:] == steps(0, 2, 4, start=6)
    with pytest.raises(ValueError, match="worker 1 of 2 holds fewer than 3 training pairs"):
        next(streamed_batches(PairStream(lambda: iter(pairs[:5]), 5), settings, 3, 1, 2, 0))


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

"""Distillation losses vs a naive per-token loop, chunking, shift and vocab handling."""

from __future__ import annotations

import math

import pytest
import torch

from leaf_ray.distillation.losses import (
    SparseTargets,
    VocabularyMismatchError,
    distill_loss,
    leaf_loss,
    shared_vocab_size,
    sparse_distill_loss,
    teacher_top_k,
)
from leaf_ray.synthetic.tokenizer import train_tokenizer

KINDS = ["forward_kl", "reverse_kl", "jsd"]


def naive_loss(student_logits, teacher_logits, mask, kind, temperature, beta):
    """One position at a time, straight from the definitions, in float64."""
    terms = []
    B, T, _ = student_logits.shape
    for b in range(B):
        for t in range(1, T):
            if not mask[b, t]:
                continue
            p_s = torch.softmax(student_logits[b, t - 1].double() / temperature, -1)
            p_t = torch.softmax(teacher_logits[b, t - 1].double() / temperature, -1)
            if kind == "forward_kl":
                terms.append(sum(p_t[v] * math.log(p_t[v] / p_s[v]) for v in range(len(p_t))))
            elif kind == "reverse_kl":
                terms.append(sum(p_s[v] * math.log(p_s[v] / p_t[v]) for v in range(len(p_t))))
            else:
                m = beta * p_t + (1 - beta) * p_s
                kl_t = sum(p_t[v] * math.log(p_t[v] / m[v]) for v in range(len(p_t)))
                kl_s = sum(p_s[v] * math.log(p_s[v] / m[v]) for v in range(len(p_t)))
                terms.append(beta * kl_t + (1 - beta) * kl_s)
    return float(sum(terms) / len(terms)) * temperature ** 2


def random_batch(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 2
    teacher = torch.randn(B, T, V, generator=g) * 2
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 3:6] = True
    mask[1, 1:7] = True
    mask[2, 6] = True
    return student, teacher, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_naive_definition(kind, temperature):
    student, teacher, mask = random_batch()
    got = distill_loss(student, teacher, mask, kind, temperature, beta=0.3, chunk_tokens=None)
    assert got.item() == pytest.approx(naive_loss(student, teacher, mask, kind, temperature, 0.3), rel=1e-5)


def test_uses_the_previous_position_to_predict_a_response_token():
    """Only logits at t-1 predict token t: changing the logits *at* a masked position does nothing."""
    student, teacher, mask = random_batch()
    before = distill_loss(student, teacher, mask)
    student2 = student.clone()
    student2[2, 6, 0] += 5.0  # mask[2, 6] is set, but position 6 predicts token 7 (outside)
    assert distill_loss(student2, teacher, mask).item() == pytest.approx(before.item(), abs=1e-7)
    student2[2, 5, 0] += 5.0  # position 5 predicts the masked token 6
    assert distill_loss(student2, teacher, mask).item() != pytest.approx(before.item(), abs=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked_with_gradients(kind):
    student, teacher, mask = random_batch(seed=1, V=50)
    full_in = student.clone().requires_grad_(True)
    chunk_in = student.clone().requires_grad_(True)
    full = distill_loss(full_in, teacher, mask, kind, 1.5, chunk_tokens=None)
    chunked = distill_loss(chunk_in, teacher, mask, kind, 1.5, chunk_tokens=2)
    full.backward()
    chunked.backward()
    assert chunked.item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(chunk_in.grad, full_in.grad, atol=1e-6, rtol=0)


def test_identical_distributions_give_zero():
    student, _, mask = random_batch()
    for kind in KINDS:
        assert distill_loss(student, student.clone(), mask, kind).item() == pytest.approx(0.0, abs=1e-6)


def test_leaf_loss_mixes_branches():
    orig, cf = torch.tensor(2.0), torch.tensor(4.0)
    assert leaf_loss(orig, cf, 1.0).item() == 2.0
    assert leaf_loss(orig, cf, 0.5).item() == 3.0
    with pytest.raises(ValueError, match="lam"):
        leaf_loss(orig, cf, 1.5)


def test_vocab_padding_rows_are_sliced_and_other_tokenizers_rejected():
    texts = ["one two three four", "five six seven"]
    tok = train_tokenizer(texts, vocab_size=300)
    same = train_tokenizer(texts, vocab_size=300)
    other = train_tokenizer(texts + ["completely different words here"], vocab_size=320)
    n = len(tok)
    assert shared_vocab_size(tok, same, n + 64, n + 128) == n + 64
    with pytest.raises(VocabularyMismatchError, match="tokenizers differ"):
        shared_vocab_size(tok, other, n, len(other))
    with pytest.raises(VocabularyMismatchError, match="smaller"):
        shared_vocab_size(tok, same, n - 1, n)
    student, teacher, mask = random_batch(V=12)
    with pytest.raises(VocabularyMismatchError, match="widths differ"):
        distill_loss(student, teacher[..., :11], mask)


# The teacher-logit cache: the sparse loss against the dense one and a float64 reference.

@pytest.mark.parametrize("kind", KINDS)
def test_sparse_loss_with_k_the_vocabulary_equals_the_dense_loss(kind):
    student, teacher, mask = random_batch(seed=2, V=40)
    dense_in = student.clone().requires_grad_(True)
    sparse_in = student.clone().requires_grad_(True)
    dense = distill_loss(dense_in, teacher, mask, kind, 1.5, beta=0.3)
    sparse = sparse_distill_loss(sparse_in, teacher_top_k(teacher, mask, 40, 1.5), mask, kind, 1.5, beta=0.3,
                                 chunk_tokens=3)
    dense.backward()
    sparse.backward()
    assert sparse.item() == pytest.approx(dense.item(), abs=1e-6)
    torch.testing.assert_close(sparse_in.grad, dense_in.grad, atol=1e-6, rtol=0)


def naive_bucket_loss(student_logits, teacher_logits, mask, k, kind, temperature, beta):
    """Per position in float64: the teacher's k most likely tokens found by sorting, the rest one
    bucket; the divergence written out term by term."""
    terms = []
    B, T, V = student_logits.shape
    for b in range(B):
        for t in range(1, T):
            if not mask[b, t]:
                continue
            p_s = torch.softmax(student_logits[b, t - 1].double() / temperature, -1).tolist()
            p_t = torch.softmax(teacher_logits[b, t - 1].double() / temperature, -1).tolist()
            top = sorted(range(V), key=lambda v: -p_t[v])[:k]
            rest = [v for v in range(V) if v not in top]
            q_t = [p_t[v] for v in top] + [sum(p_t[v] for v in rest)]
            q_s = [p_s[v] for v in top] + [sum(p_s[v] for v in rest)]
            if kind == "forward_kl":
                terms.append(sum(a * math.log(a / c) for a, c in zip(q_t, q_s)))
            elif kind == "reverse_kl":
                terms.append(sum(c * math.log(c / a) for a, c in zip(q_t, q_s)))
            else:
                m = [beta * a + (1 - beta) * c for a, c in zip(q_t, q_s)]
                terms.append(beta * sum(a * math.log(a / x) for a, x in zip(q_t, m))
                             + (1 - beta) * sum(c * math.log(c / x) for c, x in zip(q_s, m)))
    return sum(terms) / len(terms) * temperature ** 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 4])
def test_sparse_loss_with_small_k_equals_a_float64_reference(kind, k):
    student, teacher, mask = random_batch(seed=3, V=30)
    got = sparse_distill_loss(student, teacher_top_k(teacher, mask, k, 2.0), mask, kind, 2.0, beta=0.3,
                              chunk_tokens=2)
    assert got.item() == pytest.approx(naive_bucket_loss(student, teacher, mask, k, kind, 2.0, 0.3), rel=1e-5)
    # Coarsening never increases a divergence: the bucketed loss is at most the dense one.
    assert got.item() <= distill_loss(student, teacher, mask, kind, 2.0, beta=0.3).item() + 1e-6


def test_sparse_loss_stored_in_float16_stays_close_and_misaligned_targets_are_refused():
    student, teacher, mask = random_batch(seed=4, V=30)
    exact = teacher_top_k(teacher, mask, 8)
    stored = SparseTargets(exact.ids.int(), exact.logprobs.half(), exact.tail.half(), exact.vocab)
    assert sparse_distill_loss(student, stored, mask).item() == pytest.approx(
        sparse_distill_loss(student, exact, mask).item(), rel=2e-3)
    shorter = mask.clone()
    shorter[1, 6] = False
    with pytest.raises(ValueError, match="another tokenizer or chat template"):
        sparse_distill_loss(student, exact, shorter)

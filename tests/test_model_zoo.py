"""Real model families through every stage: Llama 3, Qwen 2.5, Gemma 2 and Mistral shapes
(tests/zoo.py), on code, LaTeX, newlines and unicode, with their own chat templates and
special tokens (no pad token for Llama 3 and Mistral). The in-process checks run first;
then each family goes through the pipeline on a real Ray cluster: Ray Data scoring, Ray
Train distillation, export, evaluation, the Serve app on the vLLM CPU build, and /v1/focus."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import torch

from leaf_ray.config import (
    DistillationConfig,
    EvaluationConfig,
    PipelineConfig,
    PruningConfig,
    ResourcesConfig,
    ScoringConfig,
    ServingConfig,
)
from leaf_ray.data import Record, encode_for_training, pad_token_id, render_prompt, render_sample, write_jsonl
from leaf_ray.detection.scorer import PairScorer, ScoringBatchProcessor
from leaf_ray.detection.store import read_jsonl_parts, read_originals
from leaf_ray.evaluation import greedy_generate
from leaf_ray.models import load_model
from tests import zoo
from tests.conftest import KV_CACHE_BYTES

FAMILIES = list(zoo.FAMILIES)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("zoo")
    return {name: zoo.build(name, root) for name in FAMILIES}


@pytest.fixture(scope="module")
def corpus() -> list[Record]:
    return [Record.from_dict(r) for r in zoo.records()]


def test_templates_keep_each_familys_structure(built):
    tokenizers = {name: load_model(built[name][1])[1] for name in FAMILIES}
    prompt = {name: render_prompt(tok, "  ann has 3 .  ") for name, tok in tokenizers.items()}
    assert prompt["llama3"].startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nann has 3 .<|eot_id|>")
    assert prompt["qwen2.5"].startswith(f"<|im_start|>system\n{zoo.QWEN_SYSTEM}<|im_end|>\n")  # default system prompt
    assert prompt["gemma2"].endswith("<start_of_turn>model\n") and "ann has 3 .<end_of_turn>" in prompt["gemma2"]
    assert prompt["mistral"] == "<s>[INST]   ann has 3 .   [/INST]"
    with pytest.raises(Exception, match="System role not supported"):
        tokenizers["gemma2"].apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)
    assert tokenizers["llama3"].pad_token is None and tokenizers["mistral"].pad_token is None
    assert tokenizers["qwen2.5"].pad_token == "<|endoftext|>" and tokenizers["gemma2"].pad_token == "<pad>"
    for name, tok in tokenizers.items():  # the parts are found by character offsets, trimmed or not
        rendered = render_sample(tok, "  x = 1\n\ty = 2  ", "  $\\frac{1}{2}$ 東京  ")
        start, end = rendered.instruction_span
        shift = rendered.instruction_shift
        assert "  x = 1\n\ty = 2  "[shift:shift + end - start] == rendered.text[start:end], name
        assert rendered.text[slice(*rendered.response_span)].strip() == "$\\frac{1}{2}$ 東京", name


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_at_both_levels_on_real_text_shapes(built, corpus, family):
    teacher, t_tok = load_model(built[family][0])
    student, s_tok = load_model(built[family][1])
    by_level = {}
    for level in ("instruction", "response"):
        scorer = PairScorer(teacher, t_tok, student, s_tok, ScoringConfig(corpus="-", level=level, max_length=256))
        by_level[level] = scorer.score(corpus)
    scored, errors = by_level["instruction"]
    assert not errors and len(scored) == len(corpus)
    for s in scored:  # the units tile the instruction exactly: code, LaTeX, newlines, CJK, emoji included
        assert "".join(u.text for u in s.scores.units) == s.record.instruction
        assert np.isfinite(s.scores.diff[s.scores.scored]).all()
    scored, errors = by_level["response"]
    multi_step = {r.id for r in corpus if r.response.count("\n") >= 1}
    assert {s.record.id for s in scored} == multi_step  # only multi-step responses have a prefix to score
    assert all("single step" in e.reason for e in errors)


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_no_pad_token_pads_with_a_masked_real_id(built, family):
    model, tokenizer = load_model(built[family][1])
    assert tokenizer.pad_token_id is None and pad_token_id(tokenizer) == tokenizer.eos_token_id
    short, long = "ann has 3 .", "def f(n):\n    return n * 2\n\nprint(f(21))"
    # Left-padded batch generation equals one-at-a-time generation: the padding is invisible.
    together = greedy_generate(model, tokenizer, [short, long], max_new_tokens=5)
    alone = [greedy_generate(model, tokenizer, [text], max_new_tokens=5)[0] for text in (short, long)]
    assert together == alone
    batch = encode_for_training(tokenizer, [Record("a", short, "7"), Record("b", long, "42")])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    padded = batch["attention_mask"][0] == 0
    assert (batch["input_ids"][0][padded] == tokenizer.eos_token_id).all() and not batch["target_mask"][0][padded].any()


def test_a_template_that_rewrites_content_sends_the_record_to_errors(built, tmp_path):
    """Qwen3-style templates drop <think>...</think> from assistant turns: such a record cannot be
    aligned, goes to errors/ with the reason, and the batch goes on."""
    teacher, tokenizer = load_model(built["qwen2.5"][0])
    student, _ = load_model(built["qwen2.5"][1])
    tokenizer.chat_template = zoo.THINK_STRIPPING_TEMPLATE
    records = [Record("plain", "ann has 3 . gets 4 .", "7"),
               Record("thinks", "ann has 3 . gets 4 .", "<think>\n3 + 4 = 7\n</think>\n7")]
    scorer = PairScorer(teacher, tokenizer, student, tokenizer, ScoringConfig(corpus="-"))
    stats = ScoringBatchProcessor(scorer, PruningConfig(), tmp_path)([r.id for r in records], records)
    assert stats["scored"] == 1 and stats["errors"] == 1
    (error,) = read_jsonl_parts(tmp_path, "errors")
    assert error["id"] == "thinks" and "rewrites message contents" in error["reason"]
    assert [r.id for r in read_originals(tmp_path)] == ["plain"]


def test_a_cross_tokenizer_pair_is_scored_and_refused_for_distillation_before_ray(built, corpus, tmp_path):
    import ray

    from leaf_ray.distillation.losses import VocabularyMismatchError
    from leaf_ray.distributed.distill import DistillationRun, run_distillation

    teacher_dir, student_dir = built["qwen2.5"][0], built["llama3"][1]
    teacher, t_tok = load_model(teacher_dir)
    student, s_tok = load_model(student_dir)
    scored, errors = PairScorer(teacher, t_tok, student, s_tok, ScoringConfig(corpus="-")).score(corpus)
    assert not errors and len(scored) == len(corpus)  # scores meet on character units, whatever the tokenizers

    processor = ScoringBatchProcessor(PairScorer(teacher, t_tok, student, s_tok, ScoringConfig(corpus="-")),
                                      PruningConfig(), tmp_path / "score")
    processor([r.id for r in corpus], corpus)
    (tmp_path / "score" / "summary.json").write_text("{}")
    assert not ray.is_initialized()
    run = DistillationRun(DistillationConfig(max_steps=2, batch_size=2), str(teacher_dir), str(student_dir),
                          str(tmp_path / "score"), str(tmp_path / "distill"), "cross")
    with pytest.raises(VocabularyMismatchError, match="tokenizers differ.*pick a teacher of the student's family"):
        run_distillation(run)
    assert not ray.is_initialized() and not (tmp_path / "distill" / "ray_train").exists()


# --------------------------------------------------------------------------- on Ray

@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=8, include_dashboard=False)  # engine, ingress, /v1/focus and actors each reserve CPUs
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_the_pipeline_and_the_served_api(built, cluster, tmp_path, family):
    from ray import serve

    from leaf_ray.distributed.pipeline import run_pipeline

    teacher_dir, student_dir = built[family]
    write_jsonl(tmp_path / "corpus.jsonl", zoo.records())
    answered = [r for r in zoo.records() if r["answer"]]
    write_jsonl(tmp_path / "test_answers.jsonl", answered)
    one_cpu = ResourcesConfig(num_cpus=1)
    config = PipelineConfig(
        name=f"zoo-{family.replace('.', '')}", run_dir=str(tmp_path / "run"), teacher=str(teacher_dir),
        student=str(student_dir), variants=["leaf"],
        scoring=ScoringConfig(corpus=str(tmp_path / "corpus.jsonl"), max_length=256, batch_size=32, resources=one_cpu),
        distillation=DistillationConfig(max_steps=4, batch_size=4, checkpoint_every=4, eval_every=4,
                                        bf16_autocast=False, validation_fraction=0.2, resources=one_cpu),
        evaluation=EvaluationConfig(data=[str(tmp_path / "test_answers.jsonl")], attention=False, samples=2),
        # enforce_eager: no kernel compilation at each family's cold start (answers, not speed, are tested)
        serving=ServingConfig(max_model_len=256, dtype="float32", teacher=str(teacher_dir), resources=one_cpu,
                              focus_resources=one_cpu, enforce_eager=True, kv_cache_memory_bytes=KV_CACHE_BYTES))
    try:
        report = run_pipeline(config)

        assert report["scoring"]["scored"] == len(zoo.records()) and report["scoring"]["errors"] == 0
        export = config.layout.model("leaf")
        model, tokenizer = load_model(export)
        assert type(model).__name__ == zoo.FAMILIES[family].model_class.__name__
        assert tokenizer.chat_template == zoo.FAMILIES[family].chat_template
        assert set(report["accuracy"]) == {"teacher", "student", "leaf"}

        # The served LeaF student answers as transformers does on the exported weights.
        sample = report["serving"]["sample"]
        (expected,) = greedy_generate(model, tokenizer, [sample["prompt"]],
                                      max_new_tokens=config.evaluation.max_new_tokens)
        # A byte-level model cut off at max_new_tokens may stop inside a UTF-8 character:
        # transformers shows its bytes as U+FFFD, vLLM's detokenizer holds them back.
        assert sample["answer"].rstrip("\ufffd") == expected.rstrip("\ufffd")

        url = report["serving"]["url"].removesuffix("/v1")
        prompt = zoo.TEXTS[0]  # code, with newlines and indentation
        focus = requests.post(f"{url}/v1/focus", json={"prompt": prompt, "response": "5"}, timeout=120)
        assert focus.status_code == 200, focus.text
        body = focus.json()
        assert body["teacher"] and "".join(u["text"] for u in body["units"]) == prompt
        assert all(prompt[s["start"]:s["end"]] == s["text"] for s in body["spans"])
        chat = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": config.serving.model_id, "max_tokens": 4, "messages": [{"role": "user", "content": prompt}]})
        assert chat.status_code == 200 and isinstance(chat.json()["choices"][0]["message"]["content"], str)
    finally:  # the app goes, Serve's controller and proxy stay for the next family
        serve.delete(config.name)
    assert json.loads((config.layout.distill("leaf") / "export.json").read_text())["metrics"]["step"] == 4
    assert torch.isfinite(torch.tensor(report["accuracy"]["leaf"]["test_answers"]))


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_generated_text_keeps_the_leading_space_of_a_sentencepiece_word(built, family):
    """The continuation is decoded in context, as vLLM does: '▁7' after a prompt is ' 7', not '7'."""
    from leaf_ray.evaluation import continuation_text

    _, tokenizer = load_model(built[family][1])
    prompt = tokenizer("[INST] ann has 3 [/INST]", add_special_tokens=False)["input_ids"]
    word = tokenizer("x 7", add_special_tokens=False)["input_ids"][-1:]  # the '▁7' piece
    assert tokenizer.convert_ids_to_tokens(word)[0].startswith("▁")
    assert tokenizer.decode(word, skip_special_tokens=True) == "7"  # alone, the space is lost
    assert continuation_text(tokenizer, prompt, word) == " 7"
    assert continuation_text(tokenizer, prompt, [*word, tokenizer.eos_token_id]) == " 7"

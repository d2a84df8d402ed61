"""The in-process recipe end to end on a slice of the embedded benchmark (real models, few steps)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from leaf_ray.config import PipelineConfig, load_config
from leaf_ray.data import iter_records
from leaf_ray.demo import run_demo
from leaf_ray.score_store import read_jsonl_parts, read_scores
from tests.conftest import EMBEDDED

pytestmark = pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")


def test_demo_recipe_on_a_small_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    lines = (EMBEDDED / "data" / "simple" / "distill.jsonl").read_text().splitlines()[:48]
    corpus.write_text("\n".join(lines + ['{"id": "bad", "instruction": "no response"}', "{broken"]) + "\n")
    tests = tmp_path / "test_conflict.jsonl"
    tests.write_text("\n".join((EMBEDDED / "data" / "simple" / "test_conflict.jsonl").read_text().splitlines()[:40]))
    config = load_config("configs/demo.yaml", PipelineConfig).model_copy(deep=True)
    config.run_dir = str(tmp_path / "run")
    config.scoring.corpus = str(corpus)
    config.scoring.output_dir = str(tmp_path / "run" / "score")
    config.distillation.max_steps = 8
    config.distillation.batch_size = 8
    config.evaluation.data = [str(tests)]

    report = run_demo(config)

    score = tmp_path / "run" / "score"
    summary = json.loads((score / "summary.json").read_text())
    assert summary["scored"] == 48 and summary["errors"] == 2 and summary["read"] == 50
    errors = read_jsonl_parts(score, "errors")
    assert {(e["id"], e["line"]) for e in errors} == {("bad", 49), (None, 50)}
    assert all(e["reason"] for e in errors)
    scores = read_scores(score)
    assert len(scores) == 48 and all(len(r["unit_text"]) == len(r["masked"]) == len(r["diff"]) for r in scores)
    originals = {r.id: r for r in iter_records(corpus, errors=[])}
    cfs = read_jsonl_parts(score, "counterfactuals")
    assert len(cfs) == summary["counterfactuals"] > 0
    for cf in cfs:
        text = originals[cf["source_id"]].instruction
        (start, end), = cf["char_ranges"]
        assert cf["instruction"] == text[:start] + text[end:]

    assert set(report["accuracy"]) == {"teacher", "student", "kd", "leaf"}
    assert report["accuracy"]["teacher"]["test_conflict"] == 1.0
    for variant in ("kd", "leaf"):
        model_dir = tmp_path / "run" / "distill" / variant / "model"
        assert (model_dir / "model.safetensors").exists() and (model_dir / "chat_template.jinja").exists()
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "ann has 2 . ann gets 3 more ."}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] > prompt["input_ids"].shape[1]

    # A rerun finds every record done and scores nothing again.
    again = run_demo(config)["scoring"]
    assert again["this_run"]["records"] == 0 and again["this_run"]["skipped_as_done"] == 50
    assert again["scored"] == 48 and len(read_scores(score)) == 48

"""report.html from a report dict: tables, plot, highlighted samples, escaping, self-containment.

The samples are real: three records scored by the embedded teacher and student (one with a
``<script>`` fragment added to its prompt). Accuracies are the measured figures of
benchmarks/results/embedded.json (the hard family, whose every paper row is measured on the
current build); attention masses of teacher and student are
measured here on three held-out conflict records.
"""

from __future__ import annotations

import base64
import json
import re
import time
from itertools import islice
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from leaf_ray.cli import app
from leaf_ray.report import ROWS, render_html, write_report
from tests.conftest import EMBEDDED

pytestmark = pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")

SCRIPT = "<script>alert(1)</script>"
SKIP_REASON = "the benchmark's responses are single answers: no reasoning prefix to prune"


@pytest.fixture(scope="module")
def report() -> dict:
    from leaf_ray.config import PruningConfig, ScoringConfig
    from leaf_ray.data import Record, iter_records
    from leaf_ray.detection.scorer import PairScorer, score_and_prune
    from leaf_ray.models import load_model
    from leaf_ray.evaluation import attention_mass, confounder_spans, detection_prf

    corpus = EMBEDDED / "data" / "simple" / "distill.jsonl"
    records = list(islice(iter_records(corpus), 3))
    # Text after the last ground-truth span leaves the spans valid.
    records[2] = Record(records[2].id, f"{records[2].instruction} {SCRIPT}", records[2].response,
                        records[2].answer, records[2].meta)
    config = ScoringConfig(corpus=str(corpus), device="cpu")
    teacher, t_tok = load_model(EMBEDDED / "teacher", device="cpu")
    student, s_tok = load_model(EMBEDDED / "student", device="cpu")
    start = time.perf_counter()
    pruned, errors = score_and_prune(PairScorer(teacher, t_tok, student, s_tok, config), PruningConfig(), records)
    rows = [p.score for p in pruned]
    wall = time.perf_counter() - start
    assert not errors
    meta = {r.id: r.meta for r in records}
    for row in rows:
        row["true_spans"] = [list(span) for span in confounder_spans(meta[row["id"]])]
    graded = [(list(zip(r["unit_start"], r["unit_end"], r["unit_text"])), r["masked"], meta[r["id"]]) for r in rows]
    conflict = list(islice(iter_records(corpus.with_name("test_conflict.jsonl")), 3))

    figures = json.loads((EMBEDDED.parents[1] / "benchmarks" / "results" / "embedded.json").read_text())["families"]["hard"]
    accuracy = {"teacher": {"test_conflict": figures["teacher_conflict_acc"], "test_clean": figures["teacher_clean_acc"]},
                "student": {"test_conflict": figures["student_conflict_acc"], "test_clean": figures["student_clean_acc"]},
                "leaf_instr_resp": {"skipped": SKIP_REASON}}
    for variant, v in figures["variants"].items():
        accuracy[variant] = {"test_conflict": v["conflict_acc_mean"], "test_conflict_std": v["conflict_acc_std"],
                             "test_clean": v["clean_acc_mean"]}
    return {
        "name": "demo <b>", "config": "configs/demo.yaml", "family": "simple", "seeds": 3,
        "accuracy": dict(reversed(accuracy.items())),  # the renderer restores the paper's order
        "detection": {"records": len(rows), "threshold": "quantile 0.10 (cap 0.5)",
                      **{part: vars(detection_prf(graded, part)) for part in ("clause", "number")}},
        "attention": {"leaf": figures["variants"]["leaf"]["attention_mass_mean"],
                      "kd": figures["variants"]["kd"]["attention_mass_mean"],
                      "student": attention_mass(student, s_tok, conflict),
                      "teacher": attention_mass(teacher, t_tok, conflict)},
        "samples": rows,
        "stages": {"prepare": {"wall_s": 0.1, "skipped": True}, "serve": {"skipped": "no GPU"},
                   "score": {"wall_s": wall, "tokens_per_s": sum(p.tokens for p in pruned) / wall, "records": len(pruned),
                             "counterfactuals": sum(len(p.counterfactuals) for p in pruned)}},
        "serving": {"url": "http://127.0.0.1:8000/v1", "model_id": "demo",
                    "sample": {"prompt": records[0].instruction, "answer": records[0].answer}},
    }


@pytest.fixture(scope="module")
def page(report) -> str:
    return render_html(report)


class Node:
    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.children = tag, attrs, []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find(self, predicate) -> list[Node]:
        found = [self] if predicate(self) else []
        return found + [n for c in self.children if isinstance(c, Node) for n in c.find(predicate)]


class TreeBuilder(HTMLParser):
    """The parsed page as a tree of Nodes; text is unescaped as a browser would."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.root = Node("root", {})
        self.stack = [self.root]
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(page: str) -> Node:
    builder = TreeBuilder(page)
    assert builder.stack == [builder.root], "unclosed elements"
    return builder.root


def table_cells(root: Node, table_id: str) -> list[list[str]]:
    (table,) = root.find(lambda n: n.tag == "table" and n.attrs.get("id") == table_id)
    return [[td.text() for td in tr.find(lambda n: n.tag == "td")] for tr in table.find(lambda n: n.tag == "tr")
            if tr.find(lambda n: n.tag == "td")]


def test_accuracy_rows_in_paper_order_with_mean_and_std(report, page):
    rows = table_cells(parse(page), "accuracy")
    # The paper's rows in its order, then any other (a `leaf@<detector>` row) under its own name.
    expected_keys = [k for k in ROWS if k in report["accuracy"]] + [k for k in report["accuracy"] if k not in ROWS]
    assert "leaf@grad_norm+best_clause" in expected_keys
    assert [r[0] for r in rows] == [ROWS.get(k, k) for k in expected_keys]
    # embedded.json's measured rows (kd, leaf, oracle at least), a skipped one, rows without std
    assert {"teacher", "student", "kd", "leaf", "oracle", "leaf_instr_resp"} <= set(expected_keys)
    for key, cells in zip(expected_keys, rows):
        row = report["accuracy"][key]
        if "skipped" in row:
            assert cells[1:] == [f"skipped: {SKIP_REASON}"]
            continue
        conflict = f"{row['test_conflict']:.3f}"
        if "test_conflict_std" in row:
            conflict += f" ± {row['test_conflict_std']:.3f}"
        assert cells[1:] == [conflict, f"{row['test_clean']:.3f}"]
    by_label = {r[0]: r[1:] for r in rows}
    assert by_label[ROWS["leaf"]] == ["0.310 ± 0.034", "0.823"]  # embedded.json, hard, 3 seeds
    assert by_label[ROWS["teacher"]] == ["1.000", "1.000"]  # no std: no ±
    assert "mean ± std over 3 seeds" in page


def test_detection_and_stage_tables(report, page):
    root = parse(page)
    detection = table_cells(root, "detection")
    assert [r[0] for r in detection] == ["clause", "number"]
    for cells, part in zip(detection, ("clause", "number")):
        d = report["detection"][part]
        assert cells[1:] == [f"{d[k]:.3f}" for k in ("precision", "recall", "f1", "flagged_per_record")]
    assert "threshold: quantile 0.10 (cap 0.5)" in root.text()
    stages = dict((r[0], r[1:]) for r in table_cells(root, "stages"))
    score = report["stages"]["score"]
    assert stages["score"] == [f"{score['wall_s']:.3f}", f"{score['tokens_per_s']:,.0f}", "3",
                               f"counterfactuals: {score['counterfactuals']}"]
    assert stages["prepare"] == ["0.100", "–", "–", "skipped"]
    assert stages["serve"] == ["–", "–", "–", "skipped: no GPU"]


def test_attention_plot_is_an_embedded_png(report, page):
    root = parse(page)
    (img,) = root.find(lambda n: n.tag == "img")
    prefix = "data:image/png;base64,"
    assert img.attrs["src"].startswith(prefix)
    png = base64.b64decode(img.attrs["src"][len(prefix):], validate=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 300 and height >= 100
    rows = table_cells(root, "attention")
    assert rows == [[ROWS[k], f"{report['attention'][k]:.3f}"] for k in ("teacher", "student", "kd", "leaf")]


def test_masked_units_are_highlighted_and_ground_truth_underlined(report, page):
    samples = parse(page).find(lambda n: "tokens" in n.classes)
    assert len(samples) == len(report["samples"]) == 3
    saw = {"masked": 0, "unmasked": 0, "truth": 0}
    for block, row in zip(samples, report["samples"]):
        units = [c for c in block.children if isinstance(c, Node)]
        assert len(units) == len(row["unit_text"])
        for i, unit in enumerate(units):
            assert unit.text() == row["unit_text"][i]
            in_truth = any(a <= row["unit_start"][i] and row["unit_end"][i] <= b for a, b in row["true_spans"])
            assert ("truth" in unit.classes) == in_truth
            saw["truth"] += in_truth
            if row["teacher"][i] is None:
                assert "space" in unit.classes and unit.tag == "span"
                continue
            if row["masked"][i]:
                assert unit.tag == "mark"
                saw["masked"] += 1
            else:
                assert unit.tag == "span" and not unit.find(lambda n: n.tag == "mark")
                saw["unmasked"] += 1
            assert unit.attrs["title"] == (f"teacher {row['teacher'][i]:.3f} · student {row['student'][i]:.3f} "
                                           f"· diff {row['diff'][i]:.3f}")
            strips = [n.attrs["style"] for n in unit.find(lambda n: "h" in n.classes)]
            assert [s.endswith(f",{v:.3f})") for s, v in zip(strips, (row["teacher"][i], row["student"][i]))] == [True] * 2
        assert block.text() == "".join(row["unit_text"])
    assert all(saw.values()), saw


def test_text_is_escaped(report, page):
    assert "<script" not in page.lower() and "<b>" not in page
    block = parse(page).find(lambda n: "tokens" in n.classes)[2]
    assert SCRIPT in block.text()  # shown as text, unchanged
    assert "leaf-ray report: demo <b>" in parse(page).find(lambda n: n.tag == "h1")[0].text()


def test_no_external_resources(page):
    assert "http://127.0.0.1:8000/v1" in page  # the serving URL is there, as text
    external = r"""(?:\b(?:src|href)\s*=\s*["']?\s*|url\(\s*["']?|@import\s+["']?)(?:[a-z]+:)?//"""
    assert not re.search(external, page, re.IGNORECASE)
    root = parse(page)
    assert not root.find(lambda n: n.tag in ("a", "link", "script", "iframe", "object"))
    assert all(n.attrs["src"].startswith("data:") for n in root.find(lambda n: "src" in n.attrs))


@pytest.mark.parametrize("section, marker", [("detection", 'id="detection"'), ("attention", "<img"),
                                             ("samples", 'class="tokens"'), ("stages", 'id="stages"'),
                                             ("serving", "Serving</h2>"), ("accuracy", 'id="accuracy"')])
def test_missing_sections_are_left_out(report, page, section, marker):
    assert marker in page
    without = render_html({k: v for k, v in report.items() if k != section})
    assert marker not in without
    assert 'id="stages"' in without or section == "stages"
    parse(without)  # still well formed


def test_minimal_and_partial_reports():
    page = render_html({"name": "real-corpus", "accuracy": {"custom": {"dev": 0.25}, "student": {"test_conflict": 0.5},
                                                            "kd": {"test_conflict": 0.75}},
                        "labels": {"kd": "KD (lam = 1)"}, "attention": {"student": None}})
    rows = table_cells(parse(page), "accuracy")
    # known rows and splits first, in the paper's order; own labels win; unknown rows and splits follow
    assert rows == [[ROWS["student"], "0.500", "–"], ["KD (lam = 1)", "0.750", "–"], ["custom", "–", "0.250"]]
    assert "<img" not in page  # no attention value, no plot
    assert "mean ± std" not in page
    assert parse(render_html({})).find(lambda n: n.tag == "h1")[0].text() == "leaf-ray report: run"


def test_write_report_and_cli_rerender(report, tmp_path):
    html_path = write_report(tmp_path / "run", report)
    assert html_path == tmp_path / "run" / "report.html"
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == report
    html_path.unlink()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert html_path.read_text(encoding="utf-8") == render_html(report)
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "report.json" in missing.output


def test_detection_leaderboard_renders_each_family_best_clause_f1_first():
    """The committed leaderboard (benchmarks/results/embedded.json), as `bench detect` renders it."""
    from pathlib import Path

    results = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/embedded.json").read_text())
    board = {f: v["detection_methods"] for f, v in results["families"].items() if "detection_methods" in v}
    assert {"simple", "hard", "reasoning"} <= set(board)
    root = parse(render_html({"name": "leaderboard", "detection_methods": board}))
    for family, by_detector in board.items():
        rows = table_cells(root, f"detection-methods-{family}")
        assert sorted(r[0] for r in rows) == sorted(by_detector)
        f1 = [float(r[3]) for r in rows]
        assert f1 == sorted(f1, reverse=True)
        for cells in rows:
            row = by_detector[cells[0]]
            assert cells[1:5] == [f"{row['clause']['precision']:.3f}", f"{row['clause']['recall']:.3f}",
                                  f"{row['clause']['f1']:.3f}", f"{row['number']['f1']:.3f}"]
            # The false-cut rate and the recall on records with 2+ confounders, or "–" where no
            # record has that count (the reasoning family holds at most one note).
            assert cells[5:7] == ["–" if row[k] is None else f"{row[k]:.3f}"
                                  for k in ("false_cut_rate", "multi_confounder_recall")]

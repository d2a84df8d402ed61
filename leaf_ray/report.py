"""A run's results as ``report.json`` and a self-contained ``report.html``.

The pipeline fills a plain dict; :func:`render_html` turns it into one HTML file with inline
CSS and the attention plot embedded as a PNG data URI, so the file can be mailed or attached
to a CI run and opened anywhere: it references no external resource.

The ``report.json`` schema (every section but ``name`` may be absent; absent sections are
left out of the HTML)::

    {
      "name": "demo",                        # run name
      "config": "configs/demo.yaml",         # config file of the run
      "family": "simple",                    # benchmark family evaluated (absent for real corpora)
      "seeds": 1,                            # > 1: accuracy values are means, with "<split>_std"
      "labels": {"kd": "KD (lam = 1)", ...}, # optional display names of rows; defaults in ROWS
      "accuracy": {                          # row -> split -> accuracy; rows shown in ROWS order
        "teacher": {"test_conflict": 1.0, "test_clean": 1.0},
        "kd": {"test_conflict": 0.62, "test_conflict_std": 0.012, "test_clean": 0.91},
        "leaf_instr_resp": {"skipped": "why this row was not run"},
        ...                                  # student, kd_compute_matched, leaf, random, oracle
      },
      "detection": {                         # confounder detection against ground truth
        "records": 500, "threshold": "quantile 0.10 (cap 0.5)",
        "clause": {"precision": .., "recall": .., "f1": .., "flagged_per_record": ..},
        "number": {...}                      # any dict-valued entry is one granularity
      },
      "detection_methods": {                 # the detection leaderboard (leaf-ray bench detect):
        "hard": {"grad_norm": {"clause": {"precision": .., "recall": .., "f1": ..},   # family -> detector
                               "number": {...}, "flagged_per_record": 3.7}, ...}},
      "attention": {"student": 0.31, "kd": 0.27, "leaf": 0.12},
                                             # mean attention mass on confounder tokens (test_conflict),
                                             # keyed by accuracy row; "student" is "before distillation"
      "samples": [{                          # a row of the scoring job's scores/*.parquet
        "id": "...", "unit_text": [...], "unit_start": [...], "unit_end": [...],
        "teacher": [float | null, ...], "student": [...], "diff": [...],   # null: whitespace unit
        "masked": [bool, ...], "threshold": float | null,
        "true_spans": [[start, end], ...]    # optional: ground-truth confounder character ranges,
      }],                                    # relative to the same text as unit_start
      "stages": {                            # stage -> timings; any other key is shown as a detail
        "score": {"wall_s": 10.4, "tokens_per_s": 6320, "records": 2000},
        "prepare": {"wall_s": 0.1, "skipped": true}, ...
      },
      "versus_kd": {"leaf": {"test_conflict": {"difference": 0.3, "standard_error": 0.02}}},
                                             # each student minus KD on the same prompts (paired)
      "question": {"prompt": "...", "answer": "7", "shortcuts": ["9"], "chosen": "why this prompt",
                   "answers": {"kd": "9", "leaf": "7", ...}},   # every model's answer to the served question
      "serving": {"url": "http://127.0.0.1:8000/v1", "model_id": "demo",
                  "sample": {"prompt": "...", "answer": "...", "right": true}}
    }

Accuracies, detection scores and attention masses are shown with 3 decimals (``mean ± std``
when a std is given), wall times in seconds with 3 decimals, throughput in whole tokens/s.
"""

from __future__ import annotations

import base64
import io
import json
import re
from html import escape
from pathlib import Path
from typing import Any

# Accuracy rows in the paper's order, with default labels; rows not listed follow, named by key.
ROWS = {
    "teacher": "Teacher",
    "student": "Student, before distillation",
    "kd": "KD, no mask",
    "kd_compute_matched": "KD, matched compute",
    "leaf": "LeaF, instruction mask",
    "leaf_instr_resp": "LeaF, instruction + response mask",
    "random": "Random-span control",
    "oracle": "Oracle control (true confounders)",
    "oracle_instr_resp": "Oracle control, instruction + response",
}
SPLITS = {"test_conflict": "Held-out conflict", "test_heldout": "Conflict, held-out wordings",
          "test_clean": "Held-out clean"}
STAGE_FIELDS = ("wall_s", "tokens_per_s", "records", "skipped")

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #666; } .note { color: #666; font-size: .9em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { padding: .3em .8em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th:first-child, td:first-child { text-align: left; } td.skipped { text-align: left; color: #888; font-style: italic; }
img { max-width: 100%; }
.sample { margin: 1.2em 0; } .tokens { font-family: ui-monospace, monospace; line-height: 1; }
.tok { display: inline-flex; flex-direction: column; margin: 0 0 .5em; padding: 2px 1px; background: none; color: inherit; }
.tok .t { white-space: pre; padding-bottom: 3px; }
.tok .h { height: 5px; margin-top: 1px; }
mark.tok { background: #ffd54f; border-radius: 3px; }
.truth .t, .space.truth { text-decoration: underline 2px #c62828; text-underline-offset: 3px; }
.space { white-space: pre-wrap; }
.legend span { margin-right: 1.2em; } .swatch { display: inline-block; width: 1.6em; height: .8em; vertical-align: middle; }
pre { background: #f6f6f6; padding: .6em; white-space: pre-wrap; }
"""
TEACHER_RGB, STUDENT_RGB = "33,102,172", "214,96,77"
# Attention bars: the student before distillation and the teacher stand apart from the distilled rows.
BAR_COLOURS = {"student": "#9e9e9e", "teacher": "#2e7d32"}
DISTILLED_COLOUR = "#1f77b4"


def metric(value: Any, std: Any = None) -> str:
    """A metric with 3 decimals, ``mean ± std`` when a std is given; non-numbers as text."""
    if value is None:
        return "–"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    return f"{value:.3f}" if std is None else f"{value:.3f} ± {std:.3f}"


def ordered(keys, known) -> list[str]:
    """``keys`` with the ``known`` ones first in their canonical order, then the rest as given."""
    keys = list(keys)
    return [k for k in known if k in keys] + [k for k in keys if k not in known]


def render_html(report: dict) -> str:
    """The whole report as one self-contained HTML page."""
    name = str(report.get("name", "run"))
    labels = {**ROWS, **report.get("labels", {})}
    sections = [header(report), accuracy_section(report, labels), detection_section(report.get("detection")),
                leaderboard_section(report.get("detection_methods")),
                attention_section(report.get("attention"), labels), samples_section(report.get("samples")),
                stages_section(report.get("stages")),
                serving_section(report.get("serving"), report.get("question"), labels)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>leaf-ray report: {escape(name)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(s for s in sections if s) + "\n</body></html>\n")


def write_report(run_dir: str | Path, report: dict) -> Path:
    """Write ``report.json`` and ``report.html`` into ``run_dir``; return the HTML's path."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    html_path = run / "report.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    return html_path


def header(report: dict) -> str:
    facts = [f"{label} <code>{escape(str(report[key]))}</code>"
             for key, label in (("config", "config"), ("family", "benchmark family"), ("seeds", "seeds"))
             if key in report]
    return (f"<h1>leaf-ray report: {escape(str(report.get('name', 'run')))}</h1>"
            + (f'<p class="meta">{" · ".join(facts)}</p>' if facts else ""))


def table(table_id: str, head: list[str], rows: list[str]) -> str:
    """A table; ``rows`` are ready-made ``<tr>`` elements."""
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f'<table id="{table_id}"><thead><tr>{cells}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def tr(cells: list[str]) -> str:
    """A table row from already-escaped cell contents."""
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def accuracy_section(report: dict, labels: dict[str, str]) -> str:
    accuracy = report.get("accuracy")
    if not accuracy:
        return ""
    split_keys = {k for row in accuracy.values() for k in row if k != "skipped" and not k.endswith("_std")}
    splits = ordered(sorted(split_keys), SPLITS)
    rows = []
    for key in ordered(accuracy, ROWS):
        row = accuracy[key]
        if "skipped" in row:
            rows.append(f"<tr><td>{escape(labels.get(key, key))}</td>"
                        f'<td class="skipped" colspan="{len(splits)}">skipped: {escape(str(row["skipped"]))}</td></tr>')
        else:
            rows.append(tr([escape(labels.get(key, key))] + [metric(row.get(s), row.get(f"{s}_std")) for s in splits]))
    seeds = report.get("seeds", 1)
    note = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    out = (f'<h2>Answer accuracy</h2><p class="note">Greedy decoding; {escape(note)}.</p>'
           + table("accuracy", ["Model"] + [SPLITS.get(s, s) for s in splits], rows))
    versus = report.get("versus_kd")
    if versus:
        rows = [tr([escape(labels.get(key, key))] + [
            f"{versus[key][s]['difference']:+.3f} ± {versus[key][s]['standard_error']:.3f}" if s in versus[key] else "–"
            for s in splits]) for key in ordered(versus, ROWS)]
        out += ('<p class="note">Each student\'s accuracy minus the KD student\'s on the same prompts, ± the '
                "standard error of the per-prompt difference.</p>"
                + table("versus-kd", ["Against KD"] + [SPLITS.get(s, s) for s in splits], rows))
    return out


def detection_section(detection: dict | None) -> str:
    if not detection:
        return ""
    parts = [k for k, v in detection.items() if isinstance(v, dict)]
    columns = ("precision", "recall", "f1", "flagged_per_record")
    rows = [tr([escape(p)] + [metric(detection[p].get(c)) for c in columns]) for p in parts]
    facts = [f"{escape(k)}: {escape(str(v))}" for k, v in detection.items() if not isinstance(v, dict)]
    return ("<h2>Confounder detection</h2>"
            '<p class="note">Pruned units against the benchmark\'s ground-truth confounders'
            + (f" ({'; '.join(facts)})" if facts else "") + ".</p>"
            + table("detection", ["Ground truth", "Precision", "Recall", "F1", "Flagged units / record"], rows))


def leaderboard_section(board: dict | None) -> str:
    """Per family, every detector's clause and number F1, best clause F1 first."""
    if not board:
        return ""
    parts = []
    for family, by_detector in board.items():
        rows = [tr([escape(name), metric(row["clause"]["precision"]), metric(row["clause"]["recall"]),
                    metric(row["clause"]["f1"]), metric(row["number"]["f1"]), metric(row.get("false_cut_rate")),
                    metric(row.get("multi_confounder_recall")), metric(row.get("flagged_per_record"))])
                for name, row in sorted(by_detector.items(), key=lambda kv: -kv[1]["clause"]["f1"])]
        parts.append(f"<h3>{escape(family)}</h3>" + table(
            "detection-methods-" + re.sub(r"\W+", "-", family).strip("-"),
            ["Detector", "Clause precision", "Clause recall", "Clause F1", "Number F1", "False-cut rate",
             "Recall, 2+ confounders", "Flagged units / record"], rows))
    return ("<h2>Detection leaderboard</h2>"
            '<p class="note">Each detector (scoring method + pruning post-step) against the benchmark\'s '
            "ground-truth confounder clauses and their numbers. False-cut rate: the share of records without a "
            "confounder in which a causal clause (a fact or the question) is cut. Recall, 2+ confounders: clause "
            "recall over the records that hold two or more.</p>" + "".join(parts))


def attention_section(attention: dict | None, labels: dict[str, str]) -> str:
    keys = [k for k in ordered(attention or {}, ROWS) if attention[k] is not None]
    if not keys:
        return ""
    png = base64.b64encode(attention_png([labels.get(k, k) for k in keys], [attention[k] for k in keys],
                                         [BAR_COLOURS.get(k, DISTILLED_COLOUR) for k in keys])).decode("ascii")
    rows = [tr([escape(labels.get(k, k)), metric(attention[k])]) for k in keys]
    return ("<h2>Attention on confounding tokens</h2>"
            '<p class="note">Mean attention from the answer positions onto the ground-truth confounder '
            "tokens of the held-out conflict set, over layers and heads: the student before distillation "
            "(grey) against the distilled students (blue), and the teacher (green) for reference.</p>"
            f'<img alt="attention mass on confounder tokens per model" src="data:image/png;base64,{png}">'
            + table("attention", ["Model", "Attention mass"], rows))


def attention_png(labels: list[str], values: list[float], colours: list[str]) -> bytes:
    """A bar chart of attention mass per model, as PNG bytes."""
    from matplotlib.figure import Figure  # imported here: only rendering needs matplotlib

    figure = Figure(figsize=(7, 0.45 * len(labels) + 1), dpi=100, layout="constrained")
    axes = figure.subplots()
    positions = range(len(labels))[::-1]  # first row on top
    axes.barh(positions, values, color=colours)
    for y, v in zip(positions, values):
        axes.text(v, y, f" {v:.3f}", va="center", fontsize=9)
    axes.set_yticks(list(positions), labels)
    axes.set_xlim(0, max(values) * 1.2 or 1)
    axes.set_xlabel("mean attention mass on confounder tokens")
    axes.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def samples_section(samples: list[dict] | None) -> str:
    if not samples:
        return ""
    legend = ('<p class="legend note">'
              '<span><i class="swatch" style="background:#ffd54f"></i> pruned (confounder)</span>'
              '<span style="text-decoration:underline 2px #c62828">ground-truth confounder</span>'
              f'<span><i class="swatch" style="background:rgb({TEACHER_RGB})"></i> teacher sensitivity</span>'
              f'<span><i class="swatch" style="background:rgb({STUDENT_RGB})"></i> student sensitivity</span>'
              "</p>"
              '<p class="note">Under each unit: the teacher\'s (upper) and the student\'s (lower) gradient '
              "sensitivity, min-max normalised per sample; hover a unit for the numbers. A unit is pruned "
              "when its diff (teacher minus student) is at or below the threshold.</p>")
    return "<h2>Samples: pruned spans</h2>" + legend + "".join(render_sample(s) for s in samples)


def render_sample(sample: dict) -> str:
    """One scored prompt: each unit with its mask, ground truth and sensitivity strips."""
    truth = [tuple(span) for span in sample.get("true_spans") or []]
    units = []
    for i, text in enumerate(sample["unit_text"]):
        start, end = sample["unit_start"][i], sample["unit_end"][i]
        in_truth = any(a <= start and end <= b for a, b in truth)  # the rule detection P/R/F1 counts by
        teacher, student = sample["teacher"][i], sample["student"][i]
        if teacher is None:  # whitespace: not scored, never pruned
            cls = "space truth" if in_truth else "space"
            units.append(f'<span class="{cls}">{escape(text)}</span>')
            continue
        tag = "mark" if sample["masked"][i] else "span"
        title = f"teacher {teacher:.3f} · student {student:.3f} · diff {sample['diff'][i]:.3f}"
        units.append(f'<{tag} class="tok{" truth" if in_truth else ""}" title="{escape(title)}">'
                     f'<span class="t">{escape(text)}</span>'
                     f'<span class="h" style="background:rgba({TEACHER_RGB},{teacher:.3f})"></span>'
                     f'<span class="h" style="background:rgba({STUDENT_RGB},{student:.3f})"></span></{tag}>')
    scored = sum(value is not None for value in sample["teacher"])
    threshold = sample.get("threshold")
    facts = f"{sum(sample['masked'])} of {scored} scored units pruned"
    if threshold is not None:  # None: no spread in the diff, nothing pruned
        facts += f", threshold {threshold:.3f}"
    return (f'<div class="sample"><h3>{escape(str(sample["id"]))}</h3><p class="note">{facts}</p>'
            f'<div class="tokens">{"".join(units)}</div></div>')


def stages_section(stages: dict | None) -> str:
    if not stages:
        return ""
    rows = []
    for name, stage in stages.items():
        wall, rate, records = stage.get("wall_s"), stage.get("tokens_per_s"), stage.get("records")
        details = [f"{k}: {v}" for k, v in stage.items() if k not in STAGE_FIELDS]
        skipped = stage.get("skipped")
        if skipped:  # True, or the reason
            details.insert(0, "skipped" if skipped is True else f"skipped: {skipped}")
        rows.append(tr([escape(name), "–" if wall is None else f"{wall:.3f}",
                        "–" if rate is None else f"{rate:,.0f}", "–" if records is None else f"{records:,}",
                        escape("; ".join(details))]))
    return "<h2>Stages</h2>" + table("stages", ["Stage", "Wall time (s)", "Tokens / s", "Records", "Notes"], rows)


def serving_section(serving: dict | None, question: dict | None = None, labels: dict[str, str] = ROWS) -> str:
    if not serving:
        return ""
    # The URL is shown as text, not a link: the report must reference nothing outside itself.
    out = ("<h2>Serving</h2>"
           f'<p>OpenAI-compatible endpoint <code>{escape(str(serving.get("url", "")))}</code>, '
           f'model <code>{escape(str(serving.get("model_id", "")))}</code></p>')
    sample = serving.get("sample")
    if sample:
        out += (f"<p>Prompt:</p><pre>{escape(str(sample.get('prompt', '')))}</pre>"
                f"<p>Answer:</p><pre>{escape(str(sample.get('answer', '')))}</pre>")
    if question and sample and question.get("prompt") == sample.get("prompt"):
        shortcuts = ", ".join(question.get("shortcuts") or []) or "none"
        rows = [tr([escape(labels.get(name, name)), f"<code>{escape(str(answer))}</code>"])
                for name, answer in question.get("answers", {}).items()]
        out += (f'<p class="note">The question is {escape(question.get("chosen", ""))}; the right answer is '
                f'{escape(str(question.get("answer")))}, the shortcut clauses say {escape(shortcuts)}. Every '
                "model's greedy answer to it (transformers, in the evaluation stage):</p>"
                + table("question", ["Model", "Answer"], rows))
    return out

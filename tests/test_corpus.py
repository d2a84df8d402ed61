"""Real corpus shapes in: GSM8K-, NuminaMath- (messages) and MATH-like (\\boxed) datasets and an
id-less Parquet, each written with ``datasets`` (save_to_disk) and as a hub dataset in a local
cache built here (the real layout: ``datasets--org--name/snapshots/<sha>/...``, ``refs/main``),
then read, scored on Ray, verified by their answer checker and turned into distillation pairs."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from leaf_ray.config import ColumnMapping, PipelineConfig, PruningConfig, ResourcesConfig, ScoringConfig, VerificationConfig
from leaf_ray.corpus import check_corpus, content_id, corpus_chunks, read_chunk, resolve_corpus
from leaf_ray.data import Record, parse_record
from leaf_ray.detection.store import read_originals, read_training_set
from leaf_ray.detection.verification import generation_requests, select
from leaf_ray.distributed.scoring import explode_chunk
from tests.conftest import EMBEDDED

GSM8K = [{"question": f"Ann has {n} apples and buys {n + 3} more.\nHow many now?",
          "answer": f"She has {n} + {n + 3} = <<{n}+{n + 3}={2 * n + 3}>>{2 * n + 3} apples.\n#### {2 * n + 3:,}"}
         for n in (2, 5, 9, 14, 498, 1200)]
MATH = [{"problem": f"What is $\\frac{{{n}}}{{{n + 1}}} + \\frac{{1}}{{{n + 1}}}$?",
         "solution": f"Add the numerators:\n$$\\frac{{{n} + 1}}{{{n + 1}}} = \\boxed{{1}}$$" if n % 2 else
                     f"Write it as \\left(\\dfrac{{{n}}}{{{n + 1}}}\\right) + \\frac{{1}}{{{n + 1}}}, so \\boxed{{\\dfrac{{{n + 1}}}{{{n + 1}}}}}.",
         "level": "Level 1", "type": "Algebra"} for n in range(1, 7)]
NUMINA = [{"problem": f"Solve x + {n} = {2 * n} — «réponse» en chiffres.",
           "solution": f"Subtract {n}:\n```\nx = {2 * n} - {n}\n```\nso $x = \\boxed{{{n}}}$.",
           "source": "synthetic_math",
           "messages": [{"role": "user", "content": f"Solve x + {n} = {2 * n} — «réponse» en chiffres."},
                        {"role": "assistant", "content": f"Subtract {n}:\n```\nx = {2 * n} - {n}\n```\nso $x = \\boxed{{{n}}}$."}]}
          for n in range(3, 9)]
NO_ID = [{"instruction": f"def add(a, b):\n    return a + b\n\nprint(add({n}, 1))  # what prints?",
          "response": f"It prints {n + 1}.", "answer": str(n + 1)} for n in range(6)]

# shape: (rows, column mapping, answer checker, text of the answer column)
SHAPES = {
    "gsm8k": (GSM8K, ColumnMapping(instruction="question", response="answer", answer="answer"), "gsm8k", "answer"),
    "math": (MATH, ColumnMapping(instruction="problem", response="solution", answer="solution"), "boxed", "solution"),
    "numina": (NUMINA, ColumnMapping(messages="messages", answer="solution"), "boxed", "solution"),
    "no_id": (NO_ID, ColumnMapping(), "number", "answer"),
}
SHA = "0123456789abcdef0123456789abcdef01234567"


def save_to_disk(root: Path, name: str, rows: list[dict]) -> Path:
    folder = root / "saved" / name
    if name == "gsm8k":  # a DatasetDict: the split is chosen by scoring.split
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(folder)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(folder)
    return folder


def add_to_hub_cache(cache: Path, name: str, rows: list[dict]) -> str:
    """A dataset as the hub cache holds it after a download: a snapshot and the ref to it."""
    repo = cache / f"datasets--leafray--{name}"
    data = repo / "snapshots" / SHA / "main"
    data.mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(data / "train-00000-of-00001.parquet")
    datasets.Dataset.from_list(rows[:1]).to_parquet(data / "test-00000-of-00001.parquet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return f"hf:leafray/{name}"


def records_of(files: list[Path], columns: ColumnMapping) -> list[Record]:
    """What the scoring job's read stage makes of the files (its own function, in-process)."""
    rows = [row for chunk in corpus_chunks(files, 64 << 20) for row in explode_chunk(chunk, columns.model_dump())]
    assert all(row["error"] is None for row in rows), rows
    return [parse_record(json.loads(row["payload"])) for row in rows]


def lines_walked(content: bytes) -> list[tuple[int, object]]:
    """The reference for reading JSONL: walk the bytes one by one, counting newlines; each
    non-blank line with its number and its JSON (or "error")."""
    out, number, line = [], 1, bytearray()
    for byte in content + b"\n":
        if byte != ord("\n"):
            line.append(byte)
            continue
        if bytes(line).strip():
            try:
                out.append((number, json.loads(bytes(line).decode("utf-8"))))
            except ValueError:
                out.append((number, "error"))
        number, line = number + 1, bytearray()
    return out


def rows_read_in_pieces(path: Path, chunk_bytes: int) -> list[tuple[int, object]]:
    return [(number, "error" if isinstance(obj, Exception) else obj)
            for chunk in corpus_chunks([path], chunk_bytes) for number, obj in read_chunk(chunk)]


JSONL_LINES = st.one_of(
    st.text(alphabet=st.sampled_from("ab 7\\\"$\t\réé東🙂"), max_size=12).map(
        lambda text: json.dumps({"t": text}, ensure_ascii=False).encode()),
    st.sampled_from([b"", b"  ", b'{"t": "cut', b"\r", b"\xff\xfe", b'{"t": "\xc3"}']))


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(JSONL_LINES, max_size=12), crlf=st.booleans(), last_newline=st.booleans(),
       chunk_bytes=st.integers(1, 48))
def test_a_jsonl_file_read_in_pieces_gives_every_line_once_with_its_number(tmp_path_factory, lines, crlf, last_newline,
                                                                            chunk_bytes):
    """Pieces cut anywhere (inside a line, a UTF-8 character, a CRLF) give the lines the
    byte-by-byte walk gives, each once, numbered as in the whole file."""
    content = (b"\r\n" if crlf else b"\n").join(lines) + (b"\n" if last_newline and lines else b"")
    path = tmp_path_factory.mktemp("pieces") / "corpus.jsonl"
    path.write_bytes(content)
    assert rows_read_in_pieces(path, chunk_bytes) == lines_walked(content)
    if len(content) > chunk_bytes:
        assert len(corpus_chunks([path], chunk_bytes)) == -(-len(content) // chunk_bytes)


def test_a_parquet_file_is_read_a_run_of_row_groups_at_a_time(tmp_path):
    rows = [{"id": f"r{n}", "instruction": "x = 1\n" * n, "response": "é" * n} for n in range(10)]
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)  # groups of 3, 3, 3, 1
    expected = list(enumerate(pq.read_table(path).to_pylist(), start=1))
    assert [c["row_groups"] for c in corpus_chunks([path], 1)] == [[0], [1], [2], [3]]
    assert len(corpus_chunks([path], 64 << 20)) == 1
    for chunk_bytes in (1, 2 * pq.read_metadata(path).row_group(0).total_byte_size, 64 << 20):
        assert rows_read_in_pieces(path, chunk_bytes) == expected
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    (number, error), = rows_read_in_pieces(broken, 1)  # read whole: the file's one error row
    assert number == 0 and error == "error"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpora")
    cache = root / "hub"
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(cache))
    out = {name: {"saved": str(save_to_disk(root, name, rows)), "hub": add_to_hub_cache(cache, name, rows)}
           for name, (rows, *_) in SHAPES.items()}
    yield out
    mp.undo()


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_reads_the_same_from_save_to_disk_and_the_hub_cache(sources, shape):
    rows, columns, _, _ = SHAPES[shape]
    saved = records_of(resolve_corpus(sources[shape]["saved"]), columns)
    hub = records_of(resolve_corpus(sources[shape]["hub"]), columns)
    assert saved == hub and len(saved) == len(rows)
    for record, row in zip(saved, rows):
        if shape == "numina":
            assert (record.instruction, record.response) == (row["messages"][0]["content"], row["messages"][1]["content"])
            assert record.meta == {"problem": row["problem"], "source": "synthetic_math"}  # provenance kept
        else:
            assert (record.instruction, record.response) == (row[columns.instruction], row[columns.response])
        assert record.answer == row[SHAPES[shape][3]]
    # Rows without an id get one from their text: the same on every read, different per row.
    assert saved[0].id == content_id(saved[0].instruction, saved[0].response)
    assert len({r.id for r in saved}) == len(saved)


def test_splits_and_subsets_are_chosen(sources):
    assert len(records_of(resolve_corpus(sources["gsm8k"]["saved"], split="test"), SHAPES["gsm8k"][1])) == 2
    assert len(records_of(resolve_corpus(sources["gsm8k"]["hub"], split="test", subset="main"), SHAPES["gsm8k"][1])) == 1
    with pytest.raises(ValueError, match="scoring.split: 'validation' is not a split of .*; it has train, test"):
        resolve_corpus(sources["gsm8k"]["saved"], split="validation")
    with pytest.raises(FileNotFoundError, match="no files of split 'train' in subset 'socratic'.*main/test-0000"):
        resolve_corpus(sources["gsm8k"]["hub"], subset="socratic")


def test_a_split_in_several_subsets_needs_a_subset(sources):
    import os

    cache = os.environ["HF_HUB_CACHE"]
    corpus = add_to_hub_cache(Path(cache), "two-subsets", GSM8K)
    socratic = Path(cache) / "datasets--leafray--two-subsets" / "snapshots" / SHA / "socratic"
    socratic.mkdir()
    datasets.Dataset.from_list(GSM8K[:3]).to_parquet(socratic / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match="scoring.subset: .* has split 'train' in several subsets \\(main, socratic\\)"):
        resolve_corpus(corpus)
    assert len(records_of(resolve_corpus(corpus, subset="socratic"), SHAPES["gsm8k"][1])) == 3


def test_a_missing_column_is_a_config_error_listing_the_columns(sources):
    scoring = ScoringConfig(corpus=sources["gsm8k"]["saved"], columns=ColumnMapping(instruction="problem"))
    with pytest.raises(ValueError, match="scoring.columns.instruction: column 'problem' is not in the corpus .*; "
                                         "its columns are: question, answer"):
        check_corpus(scoring)
    scoring = ScoringConfig(corpus=sources["numina"]["hub"], columns=ColumnMapping(messages="conversation"))
    with pytest.raises(ValueError, match="scoring.columns.messages: column 'conversation' .* problem, solution, source, messages"):
        check_corpus(scoring)


def test_an_uncached_hub_dataset_is_one_line_saying_what_to_do(sources, tmp_path):
    from leaf_ray.cli import app

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"teacher": "t", "student": "s", "run_dir": str(tmp_path / "run"),
                                  "scoring": {"corpus": "hf:openai/gsm8k", "subset": "main"}}))
    result = CliRunner().invoke(app, ["score", "--config", str(config)])
    assert result.exit_code == 2
    assert "scoring.corpus: dataset 'openai/gsm8k' is not in the local Hugging Face cache" in result.output
    assert "huggingface-cli download --repo-type dataset openai/gsm8k" in result.output
    assert "Traceback" not in result.output


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")
def test_every_shape_is_scored_on_ray_then_verified_and_paired(sources, tmp_path):
    """The Ray Data job over each save_to_disk dataset and one hub dataset: every row scored
    under its (hashed or mapped) id, counterfactuals cut; then the verification keep rules
    with the shape's checker, given the reference solutions as the teacher's answers and a
    wrong one as the student's, keep every pair."""
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        runs = [(shape, sources[shape]["saved"]) for shape in SHAPES] + [("gsm8k", sources["gsm8k"]["hub"])]
        for index, (shape, corpus) in enumerate(runs):
            rows, columns, checker, _ = SHAPES[shape]
            pipeline = PipelineConfig(
                run_dir=str(tmp_path / f"{index}-{shape}"), teacher=str(EMBEDDED / "teacher"),
                student=str(EMBEDDED / "student"), pruning=PruningConfig(),
                scoring=ScoringConfig(corpus=corpus, columns=columns, max_length=256, batch_size=16,
                                      resources=ResourcesConfig(num_cpus=1)))
            from leaf_ray.distributed.scoring import run_scoring

            summary = run_scoring(pipeline)
            assert (summary["scored"], summary["errors"]) == (len(rows), 0), (shape, summary)
            expected = records_of(resolve_corpus(corpus), columns)
            assert sorted(r.id for r in read_originals(pipeline.layout.score)) == sorted(r.id for r in expected)

            pairs = read_training_set(pipeline.layout.score)
            assert sum(len(p.counterfactuals) for p in pairs) > 0, shape
            requests = generation_requests(pairs)
            teacher = {row["key"]: next(r.response for r in expected if r.id == row["key"])
                       for row in requests if row["kind"] == "original"}
            wrong = {"gsm8k": "#### -1", "boxed": r"\boxed{-1}", "number": "-1"}[checker]
            student = {row["key"]: wrong for row in requests}
            selection = select(pairs, student, teacher, VerificationConfig(checker=checker))
            assert selection.summary["teacher_accuracy_original"] == 1.0, shape
            assert selection.summary["student_accuracy_original"] == 0.0, shape
            assert selection.summary["kept_originals"] == len(rows), shape
    finally:
        ray.shutdown()

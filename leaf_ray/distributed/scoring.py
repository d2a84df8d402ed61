"""Stage 1 at corpus scale: confounder scoring as a heterogeneous Ray Data pipeline.

The core's three steps (:mod:`leaf_ray.detection.scorer`) run as three stages that Ray
Data's streaming executor overlaps: CPU actors parse, render and tokenize
(:class:`PrepareActor`); the model stage's actors hold teacher and student and run only the
passes (:class:`ModelStageActor`, GPU actors on a cluster); CPU actors project, prune and cut
(:class:`PruneActor`) into a row per key. A sink (:class:`ScoreStoreDatasink`) gathers
``records_per_part`` rows and writes them as one part of the run's ``score/`` store
(:mod:`leaf_ray.detection.store`), so that a killed job resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
from ray.data.aggregate import Count, Min
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from leaf_ray.config import ColumnMapping, PipelineConfig, ScoringConfig
from leaf_ray.corpus import canonical_row, check_corpus, corpus_chunks, newlines_in, read_chunk
from leaf_ray.data import RecordError, parse_record
from leaf_ray.detection.store import error_row, finished_markers, totals, write_part, write_summary
from leaf_ray.distributed.capacity import READ_STAGE_CPUS, check_capacity
from leaf_ray.distributed.resume import (KEYS_PER_PARTITION, RESUME_FOLDER, SOURCE_SHIFT, is_done,
                                        with_small_shuffle_tasks, write_done_positions)
from leaf_ray.files import claim_folder, folder_lock


def explode_chunk(chunk: dict[str, Any], columns: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One corpus piece (:func:`leaf_ray.corpus.corpus_chunks`) -> one row per record in the record
    schema (the column mapping applied), keyed by id (or by file:line when the row has no usable
    id), with the record as JSON text or the reason it failed to decode. A generator: Ray Data
    cuts its rows into blocks as they come."""
    source = chunk["path"]
    mapping = ColumnMapping.model_validate(columns)
    for line, obj in read_chunk(chunk):
        try:
            if isinstance(obj, RecordError):
                raise obj
            obj = canonical_row(obj, mapping)
        except RecordError as exc:
            yield error_at(source, line, exc.reason)
            continue
        has_id = isinstance(obj.get("id"), (str, int)) and str(obj.get("id")).strip()
        key = str(obj["id"]) if has_id else f"{source}:{line}"
        yield {"key": key, "source": source, "line": line, "payload": json.dumps(obj), "error": None}


def error_at(source: str, line: int, reason: str) -> dict[str, Any]:
    """A row that will not be scored, keyed by where it is (its id may be missing, or taken)."""
    return {"key": f"{source}:{line}", "source": source, "line": line, "payload": None, "error": reason}


def is_readable(error: Any) -> bool:
    """Whether a row's ``error`` says it decoded: no reason string (a block whose rows all
    decoded may hand the column over as NaN floats rather than None)."""
    return not isinstance(error, str)


def row_positions(batch: dict[str, np.ndarray], order: dict[str, int]) -> np.ndarray:
    """Where each row is: its file's index in corpus order, then its line (a resume position)."""
    file_index = np.array([order[str(source)] for source in batch["source"]], dtype=np.int64)
    return file_index << SOURCE_SHIFT | batch["line"].astype(np.int64)


def repeated_ids(rows: ray.data.Dataset, files: list[str], count: int) -> dict[str, tuple[str, int]]:
    """Every id that more than one readable row has -> where its first row is (files in corpus
    order, then lines in file order): (file, line). Grouped on the cluster (Ray Data's shuffle by
    id, a partition per :data:`KEYS_PER_PARTITION` of the ``count`` rows), so the driver
    receives the repeated ids only, never every id."""
    order = {path: index for index, path in enumerate(files)}

    def positions(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        readable = np.array([is_readable(error) for error in batch["error"]], dtype=bool)
        return {"key": batch["key"][readable], "position": row_positions(batch, order)[readable]}

    grouped = rows.map_batches(positions, batch_format="numpy", num_cpus=READ_STAGE_CPUS).groupby(
        "key", num_partitions=max(1, count // KEYS_PER_PARTITION)).aggregate(
        Count(alias_name="rows"), Min("position", alias_name="first"))
    repeated = {}
    for row in grouped.filter(lambda row: row["rows"] > 1).iter_rows():
        file, line = divmod(int(row["first"]), 1 << SOURCE_SHIFT)
        repeated[row["key"]] = (files[file], line)
    return repeated


def with_repeats_as_errors(row: dict[str, Any], repeated: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """An error row, keyed by where it is, for a row whose id an earlier row has (:func:`repeated_ids`)."""
    first = repeated.get(row["key"]) if is_readable(row["error"]) else None
    if first is not None and (row["source"], row["line"]) != first:
        return error_at(row["source"], row["line"], f"duplicate id {row['key']!r}, first at {first[0]}:{first[1]}")
    return row


def keyed_positions(batch: dict[str, np.ndarray], order: dict[str, int]) -> dict[str, np.ndarray]:
    return {"key": batch["key"], "position": row_positions(batch, order)}


def without_done(batch: pa.Table, order: dict[str, int], run: str) -> pa.Table:
    """The rows of a batch that no finished part holds (:mod:`leaf_ray.distributed.resume`).
    Filtered as Arrow: a numpy batch whose errors are all None would come back as floats."""
    where = {column: batch[column].to_numpy() for column in ("source", "line")}
    return batch.filter(pa.array(~is_done(row_positions(where, order), run)))


def rows_to_score(files: list[str], scoring: ScoringConfig, markers: list[Path],
                  resume: Path) -> tuple[ray.data.Dataset, int, int]:
    """The corpus rows a run has still to score, as a dataset; how many rows the corpus has; how
    many of them finished parts (``markers``) hold. The corpus is read in pieces, a row whose id
    an earlier row has becomes an error row, and done rows are dropped (their positions written
    under ``resume``). Light tasks only: a fraction of a CPU each, so that they still run when
    the scoring actors reserve every other CPU of the node."""
    count_newlines = ray.remote(num_cpus=READ_STAGE_CPUS)(newlines_in)
    chunks = corpus_chunks([Path(f) for f in files], scoring.read_chunk_bytes,
                           lambda ranges: ray.get([count_newlines.remote(*r) for r in ranges]))
    rows = with_small_shuffle_tasks(ray.data.from_items(chunks, override_num_blocks=len(chunks))).flat_map(
        explode_chunk, fn_kwargs={"columns": scoring.columns.model_dump(exclude_unset=True)},
        num_cpus=READ_STAGE_CPUS)
    count = rows.count()
    repeated = repeated_ids(rows, files, count)
    keyed = rows.map(with_repeats_as_errors, fn_kwargs={"repeated": repeated}, num_cpus=READ_STAGE_CPUS)
    order = {path: index for index, path in enumerate(files)}
    run, skipped = write_done_positions(
        keyed.map_batches(keyed_positions, fn_kwargs={"order": order}, batch_format="numpy",
                          num_cpus=READ_STAGE_CPUS), count, len(files), markers, resume)
    pending = keyed if not skipped else keyed.map_batches(
        without_done, fn_kwargs={"order": order, "run": run}, batch_format="pyarrow", num_cpus=READ_STAGE_CPUS)
    return pending, count, skipped


class PrepareActor:
    """The CPU stage before the passes: holds the tokenizers; parses each row, renders and
    tokenizes it for both models and cuts it into units (the prepared record travels pickled),
    or gives the reason it cannot be scored."""

    def __init__(self, config: PipelineConfig):
        from leaf_ray.detection.scorer import RecordPreparer

        try:  # a missing model folder fails here first, as often as in the model stage
            self.preparer = RecordPreparer.from_paths(config.teacher, config.student, config.scoring)
        except OSError as exc:
            raise RuntimeError(_load_failure(config, exc)) from exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        prepared, errors = [], []
        for key, source, line, payload, error in zip(batch["key"], batch["source"], batch["line"],
                                                     batch["payload"], batch["error"]):
            where = {"line": int(line), "source": str(source)}
            try:
                if payload is None:
                    raise RecordError(str(error), **where)
                prepared.append(pickle.dumps(self.preparer.prepare(parse_record(json.loads(payload), **where))))
                errors.append("")
            except RecordError as exc:
                prepared.append(b"")
                errors.append(json.dumps(error_row(str(key), exc), ensure_ascii=False))
        return {"key": [str(k) for k in batch["key"]], "prepared": prepared, "error": errors}


class ModelStageActor:
    """The model stage: holds teacher and student and runs only their passes (and a rule's
    rescoring passes), so that a GPU here does not wait on rendering or pruning. Each row
    carries its batch's timing in ``model_batch`` (actor, start, end, pass seconds), which the
    sink gathers for the stage's busy share (:func:`model_stage_share`)."""

    def __init__(self, config: PipelineConfig):
        import torch

        from leaf_ray.detection.scorer import PairScorer

        try:
            self.scorer = PairScorer.from_paths(config.teacher, config.student, config.scoring)
        except (MemoryError, torch.OutOfMemoryError, RuntimeError, OSError) as exc:
            raise RuntimeError(_load_failure(config, exc)) from exc
        self.pruning = config.pruning
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from leaf_ray.detection.scorer import model_stage

        started, passes_before = time.time(), self.scorer.seconds["model_passes"]
        todo = [i for i, blob in enumerate(batch["prepared"]) if blob]
        passed = [b""] * len(batch["key"])
        for i, result in zip(todo, model_stage(self.scorer, self.pruning,
                                               [pickle.loads(batch["prepared"][i]) for i in todo])):
            passed[i] = pickle.dumps(result)
        timing = json.dumps([self.name, started, time.time(), self.scorer.seconds["model_passes"] - passes_before])
        return {"key": batch["key"], "passed": passed, "error": batch["error"], "model_batch": [timing] * len(passed)}


class PruneActor:
    """The CPU stage after the passes: projects, decides and cuts each record, into a store row
    per key, grouped by the model batch that scored it. An actor pool rather than tasks: Ray
    Data would fuse tasks into the sink's write, which waits for a whole part's rows."""

    def __init__(self, config: PipelineConfig):
        self.config = config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from leaf_ray.detection.scorer import prune, store_rows

        rows = []
        for model_batch in dict.fromkeys(batch["model_batch"]):
            members = [i for i, value in enumerate(batch["model_batch"]) if value == model_batch]
            passed = [pickle.loads(batch["passed"][i]) for i in members if batch["passed"][i]]
            errors = [(str(batch["key"][i]), json.loads(batch["error"][i])) for i in members if batch["error"][i]]
            pruned = prune(self.config.scoring, self.config.pruning, passed)
            scorer = json.loads(model_batch)[0]
            rows += [{**row, "model_batch": model_batch}
                     for row in store_rows([str(batch["key"][i]) for i in members], scorer, pruned, errors)]
        return {column: [row[column] for row in rows] for column in rows[0]}


class ScoreStoreDatasink(Datasink[dict]):
    """Writes the scoring rows into the store, ``records_per_part`` to a part (Ray Data bundles
    the blocks of many batches into one write task), and gathers the model batches' timings."""

    def __init__(self, output: Path, records_per_part: int):
        self.output = output
        self.records_per_part = records_per_part
        self.written = 0
        self.model_batches: set[str] = set()

    @property
    def min_rows_per_write(self) -> int:
        return self.records_per_part

    def write(self, blocks, ctx) -> dict:
        rows = [row for block in blocks for row in BlockAccessor.for_block(block).iter_rows(public_row_format=True)]
        return write_part(self.output, rows)

    def on_write_complete(self, write_result) -> None:
        self.written = sum(stats.get("read", 0) for stats in write_result.write_returns)
        self.model_batches = {batch for stats in write_result.write_returns for batch in stats.get("model_batches", ())}


def model_stage_share(model_batches: set[str]) -> dict[str, Any]:
    """How busy the model stage was: the seconds its actors spent in model passes over their
    wall time, each actor's from the start of its first batch to the end of its last (idle
    gaps between batches count against it; loading the models and the first wait do not)."""
    spans: dict[str, list[float]] = {}
    passes = 0.0
    for actor, start, end, pass_s in map(json.loads, model_batches):
        first, last = spans.get(actor, (start, end))
        spans[actor] = [min(first, start), max(last, end)]
        passes += pass_s
    wall = sum(last - first for first, last in spans.values())
    return {"actors": len(spans), "batches": len(model_batches), "model_pass_s": round(passes, 2),
            "wall_s": round(wall, 2), "busy_share": round(passes / wall, 3) if wall else None}


def _load_failure(config: PipelineConfig, exc: BaseException) -> str:
    import psutil

    memory = psutil.virtual_memory()
    models = f"teacher {config.teacher!r} / student {config.student!r}"
    return (f"scoring actor could not load {models} ({type(exc).__name__}: {exc}); "
            f"node memory {memory.available / 2**30:.1f} GiB free of {memory.total / 2**30:.1f} GiB; "
            f"actor reserved {config.scoring.resources.num_cpus} CPUs, {config.scoring.resources.num_gpus} GPUs")


def scoring_fingerprint(config: PipelineConfig) -> dict[str, Any]:
    """What a score/ folder's rows depend on: the models, the settings that change a score or a
    mask, the pruning rule and the code version. Not the corpus (new records are scored on a
    rerun), batch sizes or resources."""
    import leaf_ray
    from leaf_ray.models import model_fingerprint  # imports torch: kept out of the read tasks that load this module

    settings = config.scoring.model_dump(include={"level", "method", "ig_steps", "max_length", "dtype",
                                                   "bf16_autocast", "units", "unit_pattern", "response_split", "num_segments",
                                                   "prefix_fraction", "columns"})
    return {"teacher": model_fingerprint(config.teacher), "student": model_fingerprint(config.student),
            "scoring": json.dumps(settings, sort_keys=True), "pruning": json.dumps(config.pruning.model_dump(),
                                                                                   sort_keys=True),
            "leaf_ray": leaf_ray.__version__}


def run_scoring(config: PipelineConfig, response_pass: bool = False) -> dict[str, Any]:
    """Score every record not yet done; return (and write) the summary over all runs.

    ``response_pass`` scores the reasoning prefix instead, into ``score-response/``: the second
    pass a variant that trains on both levels needs (leaf_instr_resp).
    """
    started = time.perf_counter()
    output = config.layout.score
    if response_pass:
        config = config.model_copy(update={"scoring": config.scoring.model_copy(update={"level": "response"})})
        output = config.layout.score_response
    scoring = config.scoring
    files = [str(path.resolve()) for path in check_corpus(scoring)]
    output.mkdir(parents=True, exist_ok=True)
    with folder_lock(output):  # a second run on this folder refuses instead of deleting our parts
        claim_folder(output, scoring_fingerprint(config))
        check_capacity(scoring.resources.bundle(), scoring.num_actors, "scoring.resources / scoring.num_actors",
                       extra={"CPU": READ_STAGE_CPUS + scoring.cpu_stage_cpus * 2 * scoring.cpu_actors})
        markers = finished_markers(output)
        before = totals(output)

        pending, count, skipped = rows_to_score(files, scoring, markers, output / RESUME_FOLDER)
        if skipped == count:  # every row is done: no actor needs to load a model
            shutil.rmtree(output / RESUME_FOLDER)
            return write_summary(output, before, time.perf_counter() - started, 0, skipped)
        # A piece reads as one block and an actor pool hands out whole blocks, so a one-piece
        # corpus kept every actor but one idle. Blocks of about a batch's bytes fix that
        # (Dataset.repartition would, but its tasks take a whole CPU the actors hold).
        pending.context.target_max_block_size = max(
            4096, sum(Path(f).stat().st_size for f in files) * scoring.batch_size // max(count, 1))
        sink = ScoreStoreDatasink(output, scoring.records_per_part)
        # Three stages that Ray Data's streaming executor overlaps: the model stage only runs
        # passes while CPU processes prepare the next batches and prune the last ones.
        cpu_stage = {"fn_constructor_kwargs": {"config": config}, "batch_size": scoring.batch_size,
                     "compute": ray.data.ActorPoolStrategy(size=scoring.cpu_actors),
                     "num_cpus": scoring.cpu_stage_cpus}
        pending.map_batches(
            PrepareActor, **cpu_stage,
        ).map_batches(
            ModelStageActor,
            fn_constructor_kwargs={"config": config},
            batch_size=scoring.batch_size,
            compute=ray.data.ActorPoolStrategy(size=scoring.num_actors, max_concurrent_calls_per_actor=2),
            num_cpus=scoring.resources.num_cpus,
            num_gpus=scoring.resources.num_gpus,
        ).map_batches(
            PruneActor, **cpu_stage,
        ).write_datasink(sink, ray_remote_args={"num_cpus": READ_STAGE_CPUS})
        shutil.rmtree(output / RESUME_FOLDER)
        return write_summary(output, before, time.perf_counter() - started, sink.written, skipped,
                             model_stage_share(sink.model_batches))

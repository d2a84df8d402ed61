"""Stage 1d at corpus scale: Ray Data builds the teacher-logit cache of a training set.

    training-set part names -> read tasks: each part's records not cached yet
    -> TeacherCacheActor (holds the teacher): top-k rows, as Arrow tables
    -> CacheDatasink: Parquet parts of ``records_per_part`` records, a row group a batch, and a marker each

The driver holds the training set's part names: never a record nor a key (a resumed job finds
the records already cached on the cluster, :mod:`leaf_ray.distributed.resume`). A part counts as
done only when its marker exists, so a killed job resumes where it stopped and a rerun on a
finished cache does nothing. On a GPU cluster the actors run
on the inference nodes and the Ray Train workers never load the teacher.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor

from leaf_ray.config import PipelineConfig
from leaf_ray.data import Record
from leaf_ray.detection.store import batch_name, finished_markers, training_set_manifest, training_set_parts
from leaf_ray.distillation.teacher_cache import (
    BYTES_PER_ID,
    BYTES_PER_LOGPROB,
    BYTES_PER_TAIL,
    cache_folder,
    cache_rows,
    cache_table,
    part_records,
    tokenizer_fingerprint,
    write_part,
)
from leaf_ray.distributed.capacity import check_capacity
from leaf_ray.distributed.resume import RESUME_FOLDER, SOURCE_SHIFT, is_done, write_done_positions
from leaf_ray.files import claim_folder, folder_lock, write_atomically, write_text_atomically
from leaf_ray.models import load_model, model_fingerprint, shared_vocab_of

READ_CPUS = 0.25  # reading a part's records is light; it must run beside actors that hold every other CPU


def positioned_records(row: dict[str, Any], training_set: str) -> tuple[list[tuple[str, Record]], np.ndarray]:
    """One training-set part's records in key order, and their resume positions."""
    records = sorted(part_records(Path(training_set), row["part"]).items())
    return records, row["index"] << SOURCE_SHIFT | np.arange(len(records), dtype=np.int64)


def part_keys(row: dict[str, Any], training_set: str) -> list[dict[str, Any]]:
    records, positions = positioned_records(row, training_set)
    return [{"key": key, "position": int(at)} for (key, _), at in zip(records, positions)]


def pending_records(row: dict[str, Any], training_set: str, run: str | None) -> list[dict[str, str]]:
    """The records of one training-set part that the cache lacks, as JSON rows (``run``: the
    done positions of a resumed job, :mod:`leaf_ray.distributed.resume`)."""
    records, positions = positioned_records(row, training_set)
    done = is_done(positions, run) if run else np.zeros(len(records), dtype=bool)
    return [{"key": key, "record": json.dumps(record.to_dict(), ensure_ascii=False)}
            for (key, record), skip in zip(records, done) if not skip]


class TeacherCacheActor:
    """Holds the teacher; turns one batch of records into cache rows."""

    def __init__(self, config: PipelineConfig, vocab: int):
        from transformers import AutoTokenizer

        cache = config.teacher_cache
        self.teacher, _ = load_model(config.teacher, cache.dtype, cache.device)
        self.tokenizer = AutoTokenizer.from_pretrained(config.student)  # distillation renders with the student's
        self.settings = {"k": cache.top_k, "temperature": config.distillation.temperature, "vocab": vocab,
                         "max_tokens_per_batch": cache.max_tokens_per_batch}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        records = [Record.from_dict(json.loads(text)) for text in batch["record"]]
        # An Arrow table: its list columns pass to the writer without a Python object per value.
        return cache_table(cache_rows(self.teacher, self.tokenizer, records, **self.settings), self.settings["k"])


class CacheDatasink(Datasink[dict]):
    """Writes cache rows ``records_per_part`` to a part (Ray Data bundles the blocks of many
    batches into one write task), a row group per batch, then the part's marker."""

    def __init__(self, output: Path, records_per_part: int, records_per_row_group: int):
        self.output = output
        self.records_per_part = records_per_part
        self.records_per_row_group = records_per_row_group
        self.written = 0

    @property
    def min_rows_per_write(self) -> int:
        return self.records_per_part

    def write(self, blocks, ctx) -> int:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return 0
        rows = pa.concat_tables(tables)
        for start in range(0, rows.num_rows, self.records_per_part):  # a write may get more than a part
            self.write_one(rows.slice(start, self.records_per_part))
        return rows.num_rows

    def write_one(self, table: pa.Table) -> None:
        keys = table.column("key").to_pylist()
        name = batch_name(keys)
        write_atomically(self.output / "logits" / f"part-{name}.parquet",
                         lambda tmp: write_part(tmp, table, self.records_per_row_group))
        marker = {"keys": keys, "records": len(keys), "positions": int(pc.sum(table.column("positions")).as_py()),
                  "written_by": f"{socket.gethostname()}:{os.getpid()}"}
        write_text_atomically(self.output / "_done" / f"{name}.json", json.dumps(marker))

    def on_write_complete(self, write_result) -> None:
        self.written = int(sum(write_result.write_returns))


def cache_fingerprint(config: PipelineConfig, vocab: int) -> dict[str, Any]:
    """What a cache's rows depend on; a rerun with any of them changed is refused."""
    from transformers import AutoTokenizer

    import leaf_ray

    return {"teacher": model_fingerprint(config.teacher),
            "tokenizer": tokenizer_fingerprint(AutoTokenizer.from_pretrained(config.student)),
            "k": config.teacher_cache.top_k, "temperature": config.distillation.temperature, "vocab": vocab,
            "dtype": config.teacher_cache.dtype, "leaf_ray": leaf_ray.__version__}


def run_teacher_cache(config: PipelineConfig, training_set: str | Path) -> dict[str, Any]:
    """Cache the teacher for every record of ``training_set`` not cached yet; return (and write)
    the summary. A finished cache of the same training set (the same part files, every part's
    marker in place) is returned as it is, without starting the teacher."""
    if config.distillation is None:
        raise ValueError("the teacher cache is built at distillation.temperature: add a 'distillation' section")
    started = time.perf_counter()
    training_set = Path(training_set)
    output = cache_folder(training_set)
    cache = config.teacher_cache
    parts = training_set_parts(training_set)
    manifest = training_set_manifest(training_set)
    digest = manifest["digest"]
    with folder_lock(output):
        vocab = shared_vocab_of(config.teacher, config.student)
        claim_folder(output, cache_fingerprint(config, vocab))
        summary_path = output / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if (summary.get("training_set") == digest
                    and summary.get("parts") == len(list((output / "_done").glob("*.json")))):
                summary["this_run"] = {"records": 0, "wall_s": round(time.perf_counter() - started, 2)}
                return summary
            summary_path.unlink()  # the set changed, or a part was lost: finish it anew
        markers = finished_markers(output, folders=("logits",))
        check_capacity(cache.resources.bundle(), cache.num_actors, "teacher_cache.resources / teacher_cache.num_actors",
                       extra={"CPU": READ_CPUS})
        sink = CacheDatasink(output, cache.records_per_part, cache.batch_size)
        part_rows = ray.data.from_items([{"part": part, "index": index} for index, part in enumerate(parts)],
                                        override_num_blocks=len(parts))
        run, skipped = write_done_positions(
            part_rows.flat_map(part_keys, fn_kwargs={"training_set": str(training_set)}, num_cpus=READ_CPUS),
            2 * manifest["pairs"], len(parts), markers, output / RESUME_FOLDER)  # about 2 records a pair
        pending = part_rows.flat_map(pending_records, fn_kwargs={"training_set": str(training_set),
                                                                 "run": run if skipped else None}, num_cpus=READ_CPUS)
        # A training-set part's records come out as one block, and an actor pool hands out whole
        # blocks: blocks of about a batch's bytes keep every actor busy on a set of few parts.
        pair_bytes = sum(f["bytes"] for f in manifest["files"]) / max(manifest["pairs"], 1)
        pending.context.target_max_block_size = max(4096, int(pair_bytes * cache.batch_size))
        pending.map_batches(
            TeacherCacheActor,
            fn_constructor_kwargs={"config": config, "vocab": vocab},
            batch_size=cache.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cache.num_actors),
            num_cpus=cache.resources.num_cpus,
            num_gpus=cache.resources.num_gpus,
        ).write_datasink(sink, ray_remote_args={"num_cpus": READ_CPUS})
        shutil.rmtree(output / RESUME_FOLDER)
        markers = [json.loads(path.read_text()) for path in (output / "_done").glob("*.json")]
        positions = sum(m["positions"] for m in markers)
        stored = sum(path.stat().st_size for path in (output / "logits").glob("part-*.parquet"))
        summary = {"records": sum(m["records"] for m in markers), "positions": positions, "k": cache.top_k,
                   "bytes": stored, "bytes_per_position": round(stored / max(positions, 1), 1),
                   "raw_bytes_per_position": cache.top_k * (BYTES_PER_ID + BYTES_PER_LOGPROB) + BYTES_PER_TAIL,
                   "parts": len(markers), "training_set": digest,
                   "this_run": {"records": sink.written, "skipped_as_done": skipped,
                                "wall_s": round(time.perf_counter() - started, 2)}}
        write_text_atomically(summary_path, json.dumps(summary, indent=2) + "\n")
        return summary

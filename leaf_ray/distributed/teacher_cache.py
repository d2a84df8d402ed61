"""Stage 1d at corpus scale: Ray Data builds the teacher-logit cache of a training set.

An actor pool holds the teacher (:class:`TeacherCacheActor`); each batch of records becomes
one Parquet part of top-k log-probs (:func:`leaf_ray.distillation.teacher_cache.cache_rows`)
and a marker, written last, so that a killed job resumes where it stopped and a rerun on a
finished cache does nothing. On a GPU cluster the actors run on the inference nodes and the
Ray Train workers never load the teacher.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from leaf_ray.config import PipelineConfig
from leaf_ray.data import Record
from leaf_ray.detection.store import batch_name, done_keys, read_training_set
from leaf_ray.distillation.teacher_cache import (
    BYTES_PER_ID,
    BYTES_PER_LOGPROB,
    BYTES_PER_TAIL,
    cache_folder,
    cache_rows,
    tokenizer_fingerprint,
    training_set_records,
    write_part,
)
from leaf_ray.distributed.capacity import check_capacity
from leaf_ray.files import claim_folder, folder_lock, write_atomically, write_text_atomically
from leaf_ray.models import load_model, model_fingerprint, shared_vocab_of


class TeacherCacheActor:
    """Holds the teacher; turns one batch of records into a part of the cache."""

    def __init__(self, config: PipelineConfig, output: str, vocab: int):
        from transformers import AutoTokenizer

        cache = config.teacher_cache
        self.teacher, _ = load_model(config.teacher, cache.dtype, cache.device)
        self.tokenizer = AutoTokenizer.from_pretrained(config.student)  # distillation renders with the student's
        self.settings = {"k": cache.top_k, "temperature": config.distillation.temperature, "vocab": vocab,
                         "max_tokens_per_batch": cache.max_tokens_per_batch}
        self.output = Path(output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = [Record.from_dict(json.loads(text)) for text in batch["record"]]
        rows = cache_rows(self.teacher, self.tokenizer, records, **self.settings)
        keys = [str(key) for key in batch["key"]]
        name = batch_name(keys)
        write_atomically(self.output / "logits" / f"part-{name}.parquet", lambda tmp: write_part(tmp, rows, self.settings["k"]))
        marker = {"keys": keys, "records": len(rows), "positions": sum(row["positions"] for row in rows),
                  "written_by": f"{socket.gethostname()}:{os.getpid()}"}
        write_text_atomically(self.output / "_done" / f"{name}.json", json.dumps(marker))
        return {"records": [len(rows)]}


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
    the summary."""
    if config.distillation is None:
        raise ValueError("the teacher cache is built at distillation.temperature: add a 'distillation' section")
    started = time.perf_counter()
    output = cache_folder(training_set)
    cache = config.teacher_cache
    records = training_set_records(read_training_set(Path(training_set)))
    with folder_lock(output):
        vocab = shared_vocab_of(config.teacher, config.student)
        claim_folder(output, cache_fingerprint(config, vocab))
        finished = done_keys(output, folders=("logits",))
        pending = [{"key": key, "record": json.dumps(record.to_dict())}
                   for key, record in sorted(records.items()) if key not in finished]
        if pending:
            check_capacity(cache.resources.bundle(), cache.num_actors,
                           "teacher_cache.resources / teacher_cache.num_actors")
            results = ray.data.from_items(pending).map_batches(
                TeacherCacheActor,
                fn_constructor_kwargs={"config": config, "output": str(output), "vocab": vocab},
                batch_size=cache.batch_size,
                compute=ray.data.ActorPoolStrategy(size=cache.num_actors),
                num_cpus=cache.resources.num_cpus,
                num_gpus=cache.resources.num_gpus,
            )
            for _ in results.iter_rows():  # run the job; the markers count what it wrote
                pass
        markers = [json.loads(path.read_text()) for path in (output / "_done").glob("*.json")]
        positions = sum(m["positions"] for m in markers)
        stored = sum(path.stat().st_size for path in (output / "logits").glob("part-*.parquet"))
        wall_s = time.perf_counter() - started
        summary = {"records": sum(m["records"] for m in markers), "positions": positions, "k": cache.top_k,
                   "bytes": stored, "bytes_per_position": round(stored / max(positions, 1), 1),
                   "raw_bytes_per_position": cache.top_k * (BYTES_PER_ID + BYTES_PER_LOGPROB) + BYTES_PER_TAIL,
                   "this_run": {"records": len(pending), "skipped_as_done": len(records) - len(pending),
                                "wall_s": round(wall_s, 2)}}
        write_text_atomically(output / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

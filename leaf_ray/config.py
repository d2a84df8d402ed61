"""Configuration: one pydantic model per stage, and a pipeline model that holds them.

Every model forbids unknown keys, so a typo in a YAML file is an error that names the
field and the file instead of a silently ignored setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from leaf_ray.detection.units import DEFAULT_UNIT_PATTERN
from leaf_ray.errors import RunRefused


VariantName = Literal["kd", "kd_compute_matched", "leaf", "leaf_instr_resp", "random", "oracle", "oracle_instr_resp"]


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _known_checker(name: str) -> str:
    from leaf_ray.checkers import resolve_checker

    resolve_checker(name)  # raises ValueError naming what is accepted
    return name


# An answer checker of leaf_ray/checkers.py: number, exact, gsm8k, boxed, or python:module:function.
CheckerName = Annotated[str, AfterValidator(_known_checker)]


class ResourcesConfig(StageConfig):
    """Ray resources of one actor / worker / replica."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor; always set, Ray pins OMP threads to it.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; > 1 with device_map='auto' splits a teacher.")

    def bundle(self) -> dict[str, float]:
        """As a Ray resource bundle: the CPUs, and the GPUs when any are asked for."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}


class ColumnMapping(StageConfig):
    """Which corpus columns hold each part of a record (leaf_ray/corpus.py)."""

    instruction: str = Field("instruction", description="Column of the prompt.")
    response: str = Field("response", description="Column of the response to learn.")
    answer: str | None = Field("answer", description="Column of the reference answer (optional in the data).")
    id: str | None = Field("id", description="Column of the record id; rows without one get a hash of their text.")
    messages: str | None = Field(None, description="A chat column instead: the last user turn and the assistant "
                                                   "turn after it are the instruction and the response.")

    def required(self) -> dict[str, str]:
        """The columns the corpus must have: the text columns, and any other one named explicitly."""
        text = {"messages": self.messages} if self.messages else {"instruction": self.instruction,
                                                                  "response": self.response}
        named = {f: getattr(self, f) for f in ("answer", "id") if f in self.model_fields_set and getattr(self, f)}
        return {**text, **named}


class ScoringConfig(StageConfig):
    """Stage 1a: gradient sensitivity of teacher and student."""

    corpus: str = Field(..., description="Corpus file (JSONL, JSON array, Parquet) or a folder of them, a "
                                         "datasets save_to_disk folder, or hf:<repo_id> from the local hub cache.")
    split: str = Field("train", description="Split of a save_to_disk DatasetDict or an hf: dataset.")
    subset: str | None = Field(None, description="Subset (config) folder of an hf: dataset, e.g. GSM8K's 'main'.")
    columns: ColumnMapping = Field(ColumnMapping(), description="Which corpus columns make a record.")
    level: Literal["instruction", "response"] = Field(
        "instruction", description="Score the instruction (prompt), or a prefix of the reasoning.")
    method: Literal["grad_norm", "grad_x_input", "integrated_gradients", "occlusion"] = Field(
        "grad_norm", description="How each model's reliance on a unit is measured: the gradient norm (the paper's; "
                                 "1 pass), |gradient x input| (1 pass), integrated gradients (ig_steps passes), or "
                                 "occlusion, the loss change when the unit is cut out (1 forward per unit, no "
                                 "backward). README: 'Choosing a detection method'.")
    ig_steps: int = Field(8, ge=1, description="Integrated gradients: points on the path from zeroed context "
                                               "embeddings (forward+backward passes per record).")
    max_length: int = Field(2048, gt=0, description="Records longer than this (tokens) go to errors/.")
    max_tokens_per_batch: int = Field(8192, gt=0, description="Padded tokens per forward+backward.")
    padding_side: Literal["left", "right"] = Field("right",
        description="Padding side of scoring batches (results do not depend on it).")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    bf16_autocast: bool | Literal["auto"] = Field(
        False, description="bf16 autocast of the forward passes; 'auto': only where bf16 is native (GPUs with "
                           "bf16, CPUs with AVX512-BF16/AMX). Off by default: bf16 moves some masks.")
    device: str = Field("auto", description="'auto' picks cuda when available, else cpu.")
    device_map: str | None = Field(None, description="'auto' to spread a big teacher over an actor's GPUs.")
    units: Literal["text", "tokens"] = Field("text",
        description="What scores are compared and cut on: 'text' units (unit_pattern: words, identifiers, LaTeX "
                    "commands; tokenizer-independent), or the student's 'tokens' with the quantile over all of "
                    "them, whitespace included (the official code's procedure).")
    unit_pattern: str = Field(DEFAULT_UNIT_PATTERN, description="Regex for the text units scores are compared on.")
    response_split: Literal["line", "sentence", "segments"] = Field(
        "line", description="Response-level: how the response is cut into steps.")
    num_segments: int = Field(4, ge=2, description="Response-level, split 'segments': number of equal pieces.")
    prefix_fraction: float = Field(0.5, gt=0, lt=1, description="Response-level: share of steps used as prefix.")
    num_actors: int = Field(1, ge=1, description="Model stage: actors holding teacher and student (each with "
                                                 "resources), which run only the model passes.")
    cpu_actors: int = Field(1, ge=1, description="Actors in each CPU stage: the one that parses, renders and "
                                                 "tokenizes ahead of the model stage, and the one that projects "
                                                 "and prunes after it.")
    cpu_stage_cpus: float = Field(0.25, gt=0, description="CPUs each CPU-stage actor reserves.")
    batch_size: int = Field(64, ge=1, description="Records per Ray Data batch handed to each stage.")
    read_chunk_bytes: int = Field(16 << 20, ge=1, description="Corpus bytes per read task (its memory grows "
                                  "with its piece): a JSONL file is split "
                                  "into byte ranges at line starts, a Parquet file into runs of row groups; a JSON "
                                  "array or an Arrow file is read whole.")
    records_per_part: int = Field(10_000, ge=1, description="Records per part of the score store (five "
                                  "files at most): 1M records make 100 parts. A killed job redoes the parts it had not "
                                  "written.")
    resources: ResourcesConfig = Field(ResourcesConfig(), description="Per model-stage actor.")


class PruningConfig(StageConfig):
    """Stage 1b: which units are confounders, and the counterfactuals cut from them."""

    threshold: Literal["quantile", "absolute", "iterative"] = Field(
        "quantile", description="'quantile': per-sample q-quantile of diff, capped (official code); "
                                "'absolute': diff <= tau (paper); 'iterative': cut the clause the student "
                                "relies on most beyond the teacher, score again, repeat until it stops "
                                "(min_gap, strong_gap, entropy_margin, max_rounds; needs grow_spans). Needs no "
                                "count and may cut nothing (leaf_ray/detection/iterative.py).")
    quantile: float = Field(0.10, ge=0, lt=1, description="q for the quantile rule.")
    quantile_cap: float = Field(0.5, ge=0, le=1, description="Upper cap on the quantile threshold.")
    tau: float = Field(0.10, ge=0, le=1, description="Threshold for the absolute rule.")
    mode: Literal["span", "collective"] = Field(
        "span", description="'span': one counterfactual per contiguous span; 'collective': all spans at once.")
    max_spans: int | None = Field(None, ge=1, description="Keep at most this many spans per record (lowest diff first).")
    grow_spans: Literal["none", "clause", "sentence"] = Field(
        "none", description="Extend each flagged unit to the whole clause (ended by . ! ? ; , or a line break) or "
                            "sentence (. ! ? or a line break) around it, with any detection method; with max_spans, "
                            "the clauses of the lowest diff are kept.")
    min_gap: float = Field(0.2, ge=0, le=1, description="Iterative: smallest reliance gap (student share minus "
                                                        "teacher share of a clause's attribution mass) cut while "
                                                        "the student is about as sure as the teacher.")
    strong_gap: float = Field(0.6, ge=0, le=1, description="Iterative: a gap cut however unsure the student is.")
    entropy_margin: float = Field(0.3, ge=0, description="Iterative: 'about as sure': the student's mean entropy "
                                                         "over the target at most this many nats above the "
                                                         "teacher's.")
    max_rounds: int = Field(4, ge=1, description="Iterative: most clauses cut per record (one per round; each "
                                                 "round scores the cut text again).")
    break_at_newlines: bool = Field(True, description="A line break ends a span, so no counterfactual deletes one "
                                                      "(code, multi-line math); false lets spaces and line breaks "
                                                      "alike join two masked units into one span.")


    @model_validator(mode="after")
    def _iterative_cuts_clauses(self) -> PruningConfig:
        if self.threshold == "iterative" and self.grow_spans == "none":
            raise ValueError("threshold 'iterative' cuts whole clauses: set grow_spans to clause or sentence")
        return self


# vLLM's own setting. On the CPU build the share of gpu_memory_utilization is of the machine's
# memory: 0.2 of 24 GiB gave a tiny model a 4 GiB KV cache that took 20 s to allocate and warm.
KV_CACHE_BYTES_HELP = ("vLLM's KV cache size in bytes; replaces gpu_memory_utilization when set (with "
                       "enforce_eager, vLLM's CPU build also skips its warm-up pass). A cache that cannot "
                       "hold one max_model_len request fails the engine's start.")


class VerificationConfig(StageConfig):
    """Stage 1c (optional, as in the paper): generate answers with vLLM and keep the samples
    that teach something: the teacher right and the student wrong on the original, and
    counterfactuals on which the student gets it right."""

    checker: CheckerName = Field("number", description="How a generated answer is checked: number, exact, gsm8k, "
                                                         "boxed, or python:module:function.")
    keep_originals: Literal["all", "teacher_right", "teacher_right_student_wrong"] = Field("teacher_right_student_wrong",
        description="Which originals are kept for distillation.")
    keep_counterfactuals: Literal["all", "student_right"] = Field("student_right",
        description="Which counterfactuals of kept originals are kept.")
    max_tokens: int = Field(16, gt=0, description="Generated tokens per answer.")
    max_model_len: int = Field(512, gt=0, description="vLLM context length.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="vLLM dtype (float32 on CPU).")
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1, description="0.2 on the CPU build; ~0.9 on a GPU.")
    kv_cache_memory_bytes: int | None = Field(None, gt=0, description=KV_CACHE_BYTES_HELP)
    batch_size: int = Field(64, gt=0, description="Rows per vLLM engine batch.")
    enforce_eager: bool = Field(False, description="vLLM without torch.compile or graph capture: a faster cold "
                                                   "start, slower steps.")
    num_engines: int = Field(1, ge=1, description="vLLM engine replicas per model.")
    resources: ResourcesConfig = Field(ResourcesConfig(), description="Per vLLM engine replica.")


class DistillationConfig(StageConfig):
    """Stage 2: causal attention distillation."""

    variant: VariantName = Field("leaf",
        description="Which student (leaf_ray/distillation/variants.py): 'leaf'; KD baselines 'kd' and "
                    "'kd_compute_matched' (lam = 1); controls 'random' / 'oracle' spans.")
    mode: Literal["hybrid", "mixed"] = Field(
        "hybrid", description="'hybrid': lam*L(orig)+(1-lam)*L(cf) per pair; 'mixed': one shuffled pool (official).")
    lam: float = Field(0.5, ge=0, le=1, description="Weight of the original-prompt KL; 1.0 is plain KD.")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl",
        description="Divergence between teacher and student next-token distributions.")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="Mixture weight of the generalised JSD.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature; losses are scaled by T^2.")
    loss_chunk_tokens: int = Field(1024, gt=0, description="Response positions per loss chunk.")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps before the cosine decay.")
    max_steps: int = Field(1000, gt=0, description="Optimizer steps.")
    batch_size: int = Field(64, gt=0, description="Pairs per optimizer step, over all workers.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (batch_size must divide).")
    shuffle_buffer: int = Field(10_000, gt=0,
        description="Pairs each Ray Train worker shuffles among as it streams its shard (a seeded per-epoch "
                    "order; a bigger buffer mixes more and holds more in memory).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    bf16_autocast: bool | Literal["auto"] = Field("auto",
        description="bf16 autocast of forward passes; 'auto': only where bf16 is native (GPUs with bf16, CPUs "
                    "with AVX512-BF16/AMX), since emulated bf16 is slower than float32.")
    checkpoint_every: int = Field(200, gt=0, description="Steps between Ray Train checkpoints (and at the end).")
    eval_every: int | None = Field(
        None, gt=0, description="Steps between validation passes (and at the end); default: once per epoch, "
                                "i.e. every (training pairs / batch_size) steps.")
    validation_fraction: float = Field(0.05, ge=0, lt=1, description="Share of pairs held out for validation.")
    validation_max_records: int = Field(256, ge=1, description="At most this many validation pairs.")
    checker: CheckerName = Field("number", description="Answer check for validation accuracy (as verification's).")
    max_new_tokens: int = Field(8, gt=0, description="Greedy tokens per validation answer (multi-step answers need "
                                                     "more: the reasoning family's take about 30).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(False, description="Ray Train workers on GPUs (nccl) instead of CPUs (gloo).")
    strategy: Literal["ddp", "fsdp"] = Field("ddp",
        description="Data parallelism of the student: 'ddp' (a replica per worker) or 'fsdp' "
                    "(FSDP2: parameters, gradients and optimizer state sharded over workers; gloo or nccl).")
    max_failures: int = Field(2, ge=0,
        description="Worker-group restarts from the last checkpoint before the run fails.")
    seed: int = Field(0, description="Seeds sampling and initialisation; the same seed gives the same run.")
    teacher: Literal["online", "cache"] = Field("online",
        description="'online': every worker loads the teacher and runs it on every step; 'cache': workers read "
                    "the teacher's top-k log-probs from the teacher_cache stage's output and never load it.")
    resources: ResourcesConfig = Field(ResourcesConfig(), description="Per Ray Train worker.")

    def validation_interval(self, num_pairs: int) -> int:
        """Steps between validation passes: ``eval_every``, or one epoch of ``num_pairs``."""
        return self.eval_every or max(1, num_pairs // self.batch_size)

    @model_validator(mode="after")
    def _batch_divides(self) -> DistillationConfig:
        # The variants' own rules (lam, batch) are checked by leaf_ray.distillation.variants.variant_config.
        if self.batch_size % (self.grad_accum * self.num_workers):
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum * num_workers "
                             f"({self.grad_accum} * {self.num_workers})")
        return self


class TeacherCacheConfig(StageConfig):
    """Stage 1d (with ``distillation.teacher: cache``): the teacher's top-k log-probs, on Ray Data."""

    top_k: int = Field(32, ge=1, description="Log-probs kept per response position; the rest of the mass is one "
                                             "tail bucket. Storage: 6 * top_k + 2 bytes per position.")
    batch_size: int = Field(64, ge=1, description="Records per Ray Data batch handed to an actor; a batch is "
                                                  "one row group of a part, what a distillation worker decodes at "
                                                  "a time.")
    records_per_part: int = Field(4096, ge=1, description="Records (originals and counterfactuals) per Parquet "
                                                          "part: 2M records make about 500 parts. A part is the "
                                                          "unit of resume and what a write task holds: about "
                                                          "(6 * top_k + 2) bytes x positions x records_per_part.")
    max_tokens_per_batch: int = Field(8192, gt=0, description="Padded tokens per teacher forward.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Teacher weights' dtype.")
    device: str = Field("auto", description="'auto' picks cuda when available, else cpu.")
    num_actors: int = Field(1, ge=1, description="Ray Data actor pool size (teacher replicas).")
    resources: ResourcesConfig = Field(ResourcesConfig(), description="Per caching actor.")


class ServingConfig(StageConfig):
    """Serve the student over an OpenAI-compatible API (Ray Serve LLM, vLLM engine), with /v1/focus."""

    model: str | None = Field(None, description="Model directory (or Hugging Face id) to serve; in a pipeline, "
                                                "default: the run's LeaF student (distill/leaf/model).")
    model_id: str = Field("leaf-student", description="Name clients use in the 'model' field.")
    max_model_len: int = Field(512, gt=0, description="vLLM context length: prompt + completion tokens; "
                                                      "longer prompts get a 400.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    min_replicas: int = Field(1, ge=0, description="Autoscaling: fewest engine replicas.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling: most engine replicas.")
    target_ongoing_requests: int = Field(16, ge=1, description="Autoscaling target per engine replica.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Autoscaling: how long demand stays high before a "
                                                           "replica is added (Ray Serve's default).")
    downscale_delay_s: float = Field(600.0, ge=0, description="Autoscaling: how long demand stays low before a "
                                                              "replica is removed (Ray Serve's default).")
    look_back_period_s: float = Field(30.0, gt=0, description="Autoscaling: the window ongoing requests are "
                                                              "averaged over (Ray Serve's default).")
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1,
        description="vLLM's memory share for the KV cache (0.2 on the CPU build).")
    kv_cache_memory_bytes: int | None = Field(None, gt=0, description=KV_CACHE_BYTES_HELP)
    enforce_eager: bool = Field(False, description="vLLM without torch.compile or graph capture: a faster cold "
                                                   "start, slower steps.")
    resources: ResourcesConfig = Field(
        ResourcesConfig(), description="Per engine replica; num_gpus > 0 runs CUDA vLLM, 0 the CPU build.")
    api_key_env: str | None = Field(None, description="Env var holding the bearer token; unset means no auth.")
    api_key_file: str | None = Field(None, description="File holding the bearer token (a mounted secret).")
    focus: bool = Field(True, description="Serve /v1/focus from its own deployment (a transformers copy of the model).")
    teacher: str | None = Field(None, description="Teacher model for /v1/focus: adds the LeaF diff and pruned spans; "
                                                  "in a pipeline, default: the run's teacher.")
    method: Literal["grad_norm", "grad_x_input", "integrated_gradients", "occlusion"] = Field(
        "grad_norm", description="Detection method /v1/focus scores with a teacher (as scoring.method); in a "
                                 "pipeline, default: the run's scoring.method.")
    pruning: PruningConfig = Field(PruningConfig(), description="Confounder rule /v1/focus applies with a teacher; "
                                                                "in a pipeline, default: the run's pruning.")
    focus_resources: ResourcesConfig = Field(ResourcesConfig(), description="Per /v1/focus replica.")
    focus_max_queued_requests: int = Field(16, ge=1, description="/v1/focus requests queued per ingress replica; "
                                                                 "past it, 503 with Retry-After.")
    max_body_bytes: int = Field(1_048_576, gt=0, description="Largest request body; larger ones get 413.")
    max_n: int = Field(8, ge=1, description="Largest 'n' (choices per request) accepted.")
    max_stop: int = Field(4, ge=0, description="Most stop strings per request (OpenAI's limit is 4).")
    port: int = Field(8000, gt=0, lt=65536,
        description="HTTP port of the local Serve proxy (leaf-ray serve, the pipeline).")

    @model_validator(mode="after")
    def _replicas_ordered(self) -> ServingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.api_key_env and self.api_key_file:
            raise ValueError("set api_key_env or api_key_file, not both")
        if self.teacher and not self.focus:
            raise ValueError("teacher is only used by /v1/focus; set focus: true or drop teacher")
        return self


class EvaluationConfig(StageConfig):
    """Greedy answer accuracy on held-out files."""

    data: list[str] = Field(..., min_length=1, description="JSONL test files in the corpus schema, with 'answer'.")
    checker: CheckerName = Field("number", description="Answer check (as verification's); 'number': first integer "
                                                         "matches (the benchmark's).")
    max_new_tokens: int = Field(8, gt=0, description="Greedy tokens generated per answer.")
    batch_size: int = Field(64, gt=0, description="Prompts per generate call.")
    attention: bool = Field(True, description="Attention mass on ground-truth confounders (first data file).")
    samples: int = Field(6, ge=0, description="Scored prompts shown with their pruned spans in the report.")


class ModelRecipe(StageConfig):
    """Shape and training of one embedded Llama (head_dim = hidden / heads must be 64 for vLLM on CPU)."""

    layers: int = Field(..., ge=1, description="Transformer layers.")
    hidden: int = Field(..., ge=64, description="Hidden size.")
    heads: int = Field(..., ge=1, description="Attention heads.")
    steps: int = Field(..., ge=1, description="Training steps.")
    batch_size: int = Field(64, ge=1, description="Training batch size.")
    learning_rate: float = Field(1e-3, gt=0, description="Training learning rate.")
    seed: int = Field(0, description="Initialisation and data-order seed.")

    @model_validator(mode="after")
    def _head_dim_64(self) -> ModelRecipe:
        if self.hidden % self.heads or self.hidden // self.heads != 64:
            raise ValueError(f"hidden / heads = {self.hidden}/{self.heads} must be 64 (vLLM's CPU attention)")
        return self


class BenchmarkConfig(StageConfig):
    """The embedded benchmark: data splits, tokenizer, teacher and student, from seeds."""

    output_dir: str = Field("assets/embedded", description="Where the benchmark's models and data are written.")
    families: list[Literal["simple", "hard", "reasoning"]] = Field(["simple", "hard"],
        description="Task families one teacher and student are trained on: 'simple', 'hard', 'reasoning' "
                    "(multi-step answers; configs/benchmark-reasoning.yaml builds it on its own).")
    seed: int = Field(0, description="Seeds data generation and training: the build is bitwise reproducible.")
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary of the local tokenizer.")
    train_records: int = Field(30000, gt=0, description="Per family, for each of the teacher and student pools.")
    student_rho: float = Field(1.0, ge=0, le=1, description="P(distractor = answer) when pre-training the student.")
    distill_rho: float = Field(0.9, ge=0, le=1, description="P(a correlated clause's number = answer) in the "
                                                            "distillation corpora.")
    distill_records: int = Field(2000, gt=0, description="Per family and distillation corpus.")
    test_conflict_records: int = Field(500, gt=0,
        description="Held-out records where the distractor disagrees with the answer.")
    test_heldout_records: int = Field(500, gt=0,
        description="Held-out conflict records whose correlated clauses use wordings no training split has "
                    "(simple and hard).")
    test_clean_records: int = Field(300, gt=0, description="Held-out records without a correlated clause.")
    detection_records: int = Field(500, gt=0, description="Distillation records scored for detection F1, per family.")
    teacher: ModelRecipe = Field(ModelRecipe(layers=4, hidden=256, heads=4, steps=500, seed=0),
        description="Teacher recipe.")
    student: ModelRecipe = Field(ModelRecipe(layers=2, hidden=128, heads=2, steps=300, seed=1),
        description="Student recipe.")


class PipelineConfig(StageConfig):
    """The whole run: each stage's settings and where the run lives."""

    name: str = Field("leaf", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Run name: Ray Train run names and the served model id derive from it.")
    run_dir: str = Field("runs/leaf",
        description="Where every stage writes (report.json, report.html, score/, distill/...).")
    benchmark: BenchmarkConfig | None = Field(
        None, description="Build the embedded benchmark first (skipped when its output_dir is complete).")
    teacher: str = Field(..., description="Teacher model: a local Hugging Face model directory (every stage uses it).")
    student: str = Field(..., description="Student model to score and distil from: a local Hugging Face model directory.")
    variants: list[VariantName] = Field(
        ["kd", "leaf"], min_length=1, description="Students the pipeline distils, each from the same config.")
    scoring: ScoringConfig = Field(..., description="Stage 1a settings (required).")
    pruning: PruningConfig = Field(PruningConfig(), description="Stage 1b settings.")
    verification: VerificationConfig | None = Field(None, description="Optional stage 1c; absent: no vLLM filtering.")
    teacher_cache: TeacherCacheConfig = Field(TeacherCacheConfig(),
        description="Stage 1d settings: used when distillation.teacher is 'cache'.")
    distillation: DistillationConfig | None = Field(None,
        description="Stage 2 settings; absent: the pipeline stops after scoring.")
    serving: ServingConfig | None = Field(None, description="Serve the LeaF student at the end; absent: no serving.")
    evaluation: EvaluationConfig | None = Field(None, description="Held-out evaluation and report contents.")

    @property
    def layout(self) -> RunLayout:
        return RunLayout(Path(self.run_dir))

    @model_validator(mode="after")
    def _fill_defaults_from_the_run(self) -> PipelineConfig:
        if self.serving is not None:
            defaults = {"model_id": self.name,  # clients ask for the run by its name
                        # /v1/focus detects as the run did, against the run's teacher
                        "method": self.scoring.method, "pruning": self.pruning,
                        **({"teacher": self.teacher} if self.serving.focus else {})}
            for key, value in defaults.items():
                if key not in self.serving.model_fields_set:
                    setattr(self.serving, key, value)
        return self


@dataclass(frozen=True)
class RunLayout:
    """Every path of a run, derived from ``run_dir``: the contract between the stages.

    score/             the scoring job's store: originals and counterfactuals (a training set),
                       scores, errors (leaf_ray/detection/store.py)
    score-response/    the same at response level, when a variant trains on the reasoning prefix
                       (verify-response/ its verified pairs)
    verify/            the kept training set after vLLM verification (optional)
    variants/<name>/   training sets of the control variants (random, oracle spans)
    distill/<name>/    Ray Train checkpoints, metrics.jsonl, export.json and the model/ export
    evaluation.json, report.json, report.html
    """

    root: Path

    @property
    def score(self) -> Path:
        return self.root / "score"

    @property
    def verify(self) -> Path:
        return self.root / "verify"

    def variant_data(self, variant: str) -> Path:
        return self.root / "variants" / variant

    @property
    def score_response(self) -> Path:
        """The response-level scoring pass (for leaf_instr_resp), a store like ``score``."""
        return self.root / "score-response"

    @property
    def verify_response(self) -> Path:
        return self.root / "verify-response"

    def distill(self, variant: str) -> Path:
        return self.root / "distill" / variant

    def model(self, variant: str) -> Path:
        return self.distill(variant) / "model"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"


class ConfigError(RunRefused):
    """A config file that does not validate; the message names the file and each bad field."""


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def load_config(path: str | Path, model: type[ConfigT]) -> ConfigT:
    """Read YAML at ``path`` into ``model``, with errors that name the file and the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return model.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: invalid {model.__name__}:\n{problems}") from None

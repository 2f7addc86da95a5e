"""Supervised warm start of a fan-out LM on the catalog's own (collection title -> one line per item) pairs, before
RL: it teaches the K-line format and the catalog's vocabulary; the lines name the items or (`typed`) the title and
each item's type. For the bootstrap LM (see `tiny`) and for a pretrained one (LoRA by default, merged into the saved
weights so that every later stage loads a plain folder)."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from r4t_pipeline.config import SftLines
from r4t_pipeline.device import resolve_device
from r4t_pipeline.fanout import build_messages, distinct_lines
from r4t_pipeline.folm.callbacks import LogCallback
from r4t_pipeline.folm.models import load_causal_lm
from r4t_pipeline.io import atomic_dir
from r4t_pipeline.tracking import LogFn


def warm_start_lines(title: str, items: Sequence[tuple[str, str]], style: SftLines) -> list[str]:
    """The answer the warm start teaches for one set, from its items' (name, category): `item_names`, the names;
    `typed`, the title followed by each item's category ("boho festival" -> "boho festival sandals"), the name
    where an item has none; empty and duplicate lines dropped as the parser drops them (`distinct_lines`)."""
    if style == "typed":
        return distinct_lines(f"{title} {category.lower()}" if category.strip() else name for name, category in items)
    return distinct_lines(name for name, _ in items)


def sft_warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, Sequence[str]]],
    k: int,
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    log_fn: LogFn | None = None,
) -> list[float]:
    """Teach the fan-out format on TRL's SFTTrainer: (collection title -> its item names, one per line), the loss
    on the answer and its end-of-turn only, 10 warm-up steps then a linear decay. Returns the loss per step."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    usable = [(title, items) for title, items in pairs if title.strip() and items]
    if not usable:
        raise ValueError("pairs: no (title, items) pair with a non-empty title and at least one item")
    # the run reads at most steps x batch_size examples: tokenize only those (a seeded draw without repeats, as
    # one shuffled epoch would give), not the whole catalog
    usable = random.Random(seed).sample(usable, min(len(usable), steps * batch_size))
    rows = [{"prompt": build_messages(title, k), "completion": [{"role": "assistant", "content": "\n".join(items[:k])}]}
            for title, items in usable]
    with tempfile.TemporaryDirectory() as scratch:  # nothing is saved mid-run: the caller writes the model
        args = SFTConfig(output_dir=scratch, max_steps=steps, per_device_train_batch_size=min(batch_size, len(rows)),
                         learning_rate=lr, lr_scheduler_type="linear", warmup_steps=min(10, steps), weight_decay=0.0,
                         max_grad_norm=1.0, seed=seed, logging_steps=1, save_strategy="no", report_to="none",
                         use_cpu=resolve_device().type == "cpu", bf16=False, fp16=False,
                         gradient_checkpointing=False, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[LogCallback(log_fn, lambda logs: {"sft_loss": logs["loss"]})] if log_fn else [])
        trainer.train()
    model.eval()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def warm_start_pretrained(
    spec: str,
    pairs: Sequence[tuple[str, Sequence[str]]],
    out_dir: Path,
    k: int,
    steps: int,
    lr: float,
    lora_rank: int = 16,
    batch_size: int = 8,
    seed: int = 0,
    log_fn: LogFn | None = None,
) -> list[float]:
    """`spec` (hub id or folder) fine-tuned on `pairs`, LoRA of `lora_rank` on every linear layer (0: all weights),
    saved atomically as a plain HF folder. Returns the SFT losses."""
    model, tokenizer = load_causal_lm(spec, lora_rank=lora_rank or None)
    losses = sft_warm_start(model, tokenizer, pairs, k, steps, lr, batch_size, seed, log_fn)
    if lora_rank:
        model = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return losses

"""Offline bootstrap FOLM (SPEC §3): a locally trained tokenizer, a small random Llama, and an SFT warm start
on (collection title -> item names, one per line). The warm-started model is the zero-shot baseline."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from r4t_pipeline.config import TinyLMSize
from r4t_pipeline.device import resolve_device
from r4t_pipeline.fanout import build_messages
from r4t_pipeline.folm.callbacks import LogCallback
from r4t_pipeline.io import atomic_dir

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, as SmolLM2 and Qwen use, so that tiny and pretrained models share one prompt path.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (never fails on unseen characters), with ChatML special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                        chat_template=CHAT_TEMPLATE)
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_lm(
    tokenizer: PreTrainedTokenizerBase, size: TinyLMSize | None = None, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM sized for the CPU."""
    size = size or TinyLMSize()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden_size, num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads, num_key_value_heads=size.num_heads,
        intermediate_size=size.intermediate_size, max_position_embeddings=size.max_positions,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def sft_warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, Sequence[str]]],
    k: int,
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
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


def bootstrap_folm(
    pairs: Sequence[tuple[str, Sequence[str]]],
    out_dir: Path,
    k: int,
    sft_steps: int,
    size: TinyLMSize | None = None,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
) -> list[float]:
    """Tokenizer + tiny Llama + SFT warm start on `pairs`, saved atomically as an HF folder. Returns SFT losses."""
    size = size or TinyLMSize()
    # The tokenizer sees the prompt too, so the fixed instruction costs few tokens per rollout.
    texts = [message["content"] for title, _ in pairs[:50] for message in build_messages(title, k)]
    texts += [title for title, _ in pairs] + [item for _, items in pairs for item in items]
    tokenizer = train_tokenizer(texts, size.vocab_size)
    model = build_tiny_lm(tokenizer, size, seed).to(resolve_device())
    losses = sft_warm_start(model, tokenizer, pairs, k, sft_steps, lr, batch_size, seed, log_fn)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return losses

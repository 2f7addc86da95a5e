"""Offline bootstrap FOLM (SPEC §3): a locally trained tokenizer, a small random Llama, and an SFT warm start
on (collection title -> item names, one per line). The warm-started model is the zero-shot baseline."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
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
from r4t_pipeline.folm.generate import prompt_ids
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


def _sft_example(tokenizer: PreTrainedTokenizerBase, title: str, items: Sequence[str], k: int) -> tuple[list[int], int]:
    """Token ids of prompt + answer and the prompt length (the loss covers the answer and its eos only)."""
    prompt = prompt_ids(tokenizer, title, k)
    answer = tokenizer("\n".join(items[:k]) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt + answer, len(prompt)


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
    """Teach the fan-out format: (collection title -> its item names, one per line). Returns loss per step."""
    examples = [_sft_example(tokenizer, title, items, k) for title, items in pairs if title.strip() and items]
    if not examples:
        raise ValueError("pairs: no (title, items) pair with a non-empty title and at least one item")
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    rng = random.Random(seed)
    losses: list[float] = []
    model.train()
    for step in tqdm(range(1, steps + 1), desc="sft", disable=None):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        attention = torch.zeros_like(input_ids)
        for row, (ids, n_prompt) in enumerate(batch):  # right padding: positions need no shifting
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            attention[row, : len(ids)] = 1
        loss = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_fn:
            log_fn(step, {"sft_loss": losses[-1]})
    model.eval()
    return losses


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

"""Offline bootstrap FOLM (SPEC §3): a locally trained tokenizer, a small random Llama, and the SFT warm start of
`sft` on (collection title -> item names, one per line). The warm-started model is the zero-shot baseline."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from r4t_pipeline.config import TinyLMSize
from r4t_pipeline.device import resolve_device
from r4t_pipeline.fanout import build_messages
from r4t_pipeline.folm.sft import sft_warm_start
from r4t_pipeline.io import atomic_dir
from r4t_pipeline.tracking import LogFn

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


def bootstrap_folm(
    pairs: Sequence[tuple[str, Sequence[str]]],
    out_dir: Path,
    k: int,
    steps: int,
    size: TinyLMSize | None = None,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    log_fn: LogFn | None = None,
) -> list[float]:
    """Tokenizer + tiny Llama + SFT warm start on `pairs`, saved atomically as an HF folder. Returns SFT losses."""
    size = size or TinyLMSize()
    # The tokenizer sees the prompt too, so the fixed instruction costs few tokens per rollout.
    texts = [message["content"] for title, _ in pairs[:50] for message in build_messages(title, k)]
    texts += [title for title, _ in pairs] + [item for _, items in pairs for item in items]
    tokenizer = train_tokenizer(texts, size.vocab_size)
    model = build_tiny_lm(tokenizer, size, seed).to(resolve_device())
    losses = sft_warm_start(model, tokenizer, pairs, k, steps, lr, batch_size, seed, log_fn)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return losses

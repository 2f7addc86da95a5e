"""Batched fan-out sampling for retrieval and synthesis: left-padded prompts, KV cache, no grad."""

from __future__ import annotations

import functools

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from r4t_pipeline.fanout import build_messages, build_prompt_text


def prompt_ids(tokenizer: PreTrainedTokenizerBase, query: str, k: int) -> list[int]:
    """Prompt token ids: the chat template when the tokenizer has one (it adds its own special tokens)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(build_messages(query, k), add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(build_prompt_text(query, k))["input_ids"]


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [tokenizer.eos_token_id, *configured] if i is not None})


def _left_pad(rows: list[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return ids, mask


def _until_eos(row: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """The completion up to and including its first end-of-sequence token (the rest is padding)."""
    hits = torch.isin(row, torch.tensor(eos_ids)).nonzero()
    return row[: int(hits[0]) + 1] if len(hits) else row


class MinLinesLogitsProcessor(LogitsProcessor):
    """Bans end-of-sequence until the completion has `min_lines` lines, counted by the newlines it wrote.
    `newlines` (`newline_counts`) must be on the device the model generates on: it is read at every token."""

    def __init__(self, newlines: torch.Tensor, eos_ids: list[int], prompt_width: int, min_lines: int):
        self.newlines, self.eos_ids, self.prompt_width, self.min_lines = newlines, eos_ids, prompt_width, min_lines

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        written = input_ids[:, self.prompt_width:]
        lines = 1 + self.newlines[written.clamp(max=len(self.newlines) - 1)].sum(dim=1)
        short = lines < self.min_lines
        scores[short.nonzero(), torch.tensor(self.eos_ids, device=scores.device)] = float("-inf")
        return scores


# Decoding the whole vocabulary takes ~0.45 s for SmolLM2: once per tokenizer, not per call. Bounded, because the
# service loads a new tokenizer at each reload and the cache keys on identity.
@functools.lru_cache(maxsize=4)
def newline_counts(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """How many newlines each token id writes (read only)."""
    return torch.tensor([text.count("\n") for text in tokenizer.batch_decode([[i] for i in range(len(tokenizer))])])


@torch.no_grad()
def generate_fanouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    queries: list[str],
    k: int,
    num_samples: int = 1,
    temperature: float = 0.9,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    seed: int | None = None,
    no_repeat_ngram_size: int = 0,
    min_lines: int = 0,
) -> list[list[str]]:
    """Raw completion texts, `num_samples` per query: pure ancestral sampling at `temperature` (no top-k/top-p,
    as GRPO samples), greedy at 0; `no_repeat_ngram_size` and `min_lines` as in `FanoutSampling`."""
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples, batch_size, max_new_tokens must be >= 1 "
                         f"(got {num_samples}, {batch_size}, {max_new_tokens})")
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}
    config = GenerationConfig(**sampling, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=eos_ids, no_repeat_ngram_size=no_repeat_ngram_size, use_cache=True)
    encoded = [torch.tensor(prompt_ids(tokenizer, q, k)) for q in queries]
    query_index = [i for i in range(len(queries)) for _ in range(num_samples)]
    was_training = model.training
    model.eval()
    grouped: list[list[str]] = [[] for _ in queries]
    newlines = newline_counts(tokenizer).to(device) if min_lines > 1 else None
    if newlines is not None and not newlines.any():
        raise ValueError("min_lines: the tokenizer has no token that writes a newline")
    for start in range(0, len(query_index), batch_size):
        rows = query_index[start : start + batch_size]
        ids, mask = _left_pad([encoded[i] for i in rows], tokenizer.pad_token_id)
        processors = LogitsProcessorList(
            [MinLinesLogitsProcessor(newlines, eos_ids, ids.shape[1], min_lines)] if min_lines > 1 else [])
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             logits_processor=processors)
        completions = [_until_eos(row, eos_ids).tolist() for row in out[:, ids.shape[1] :].cpu()]
        for i, text in zip(rows, tokenizer.batch_decode(completions, skip_special_tokens=True)):
            grouped[i].append(text)
    model.train(was_training)
    return grouped

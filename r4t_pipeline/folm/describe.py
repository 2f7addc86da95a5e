"""An LLM names an untitled curated set (R4T Appendix C.2): the WSCR query for its reference set."""

from __future__ import annotations

from collections.abc import Callable

import torch

from r4t_pipeline.fanout import parse_fanout
from r4t_pipeline.folm.models import load_causal_lm
from r4t_pipeline.paths import assets_dir

PROMPT_FILE = "prompts/wscr_query.txt"


def collection_query_writer(model_spec: str, max_items: int = 8,
                            max_new_tokens: int = 16) -> Callable[[list[str]], str]:
    """A `QueryWriter` backed by a causal LM (hub id or folder): item texts in, a concise query out
    ('' when the model writes nothing usable, so the caller can fall back to a keyword summary)."""
    model, tokenizer = load_causal_lm(model_spec)
    template = (assets_dir() / PROMPT_FILE).read_text(encoding="utf-8").strip()

    @torch.no_grad()
    def write(item_texts: list[str]) -> str:
        prompt = template.format(items="\n".join(f"- {t}" for t in item_texts[:max_items]))
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   tokenize=False)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not tokenizer.chat_template).to(model.device)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=False)
        first = parse_fanout(text, 1).subqueries  # the same cleaning as a fan-out line
        return first[0] if first else ""

    return write

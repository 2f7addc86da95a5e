"""Fan-out language model (FOLM): loading, supervised warm start, offline bootstrap, batched sampling, GRPO
+ soft-PPO training."""

from r4t_pipeline.config import FolmTrainConfig, TinyLMSize
from r4t_pipeline.folm.generate import generate_fanouts
from r4t_pipeline.folm.grpo import FolmTrainResult, soft_ppo_token_loss, train_folm
from r4t_pipeline.folm.models import DEFAULT_BASE_MODEL, OfflineModelUnavailable, load_causal_lm
from r4t_pipeline.folm.sft import sft_warm_start, warm_start_pretrained
from r4t_pipeline.folm.tiny import bootstrap_folm, build_tiny_lm, train_tokenizer

__all__ = [
    "DEFAULT_BASE_MODEL", "FolmTrainConfig", "FolmTrainResult", "OfflineModelUnavailable",
    "TinyLMSize", "bootstrap_folm", "build_tiny_lm", "generate_fanouts", "load_causal_lm",
    "sft_warm_start", "soft_ppo_token_loss", "train_folm", "train_tokenizer", "warm_start_pretrained",
]

"""The stage configurations: plain pydantic models, no torch or transformers, so that loading the settings
(and `r4t --help`) stays fast. The library modules that run a stage take these as arguments."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TinyLMSize(BaseModel):
    """Shape of the bootstrap Llama; the defaults give ~1M parameters with a 2k vocabulary."""

    model_config = ConfigDict(extra="forbid")
    vocab_size: int = Field(2048, ge=300)
    hidden_size: int = Field(128, ge=16)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(384, ge=16)
    max_positions: int = Field(512, ge=64)


# The two task regimes (SPEC §1): open-ended (reference-free) and with a reference set to cover.
Regime = Literal["oar", "wscr"]

# What a warm-start line says about one item of a training set (see `folm.sft.warm_start_lines`).
SftLines = Literal["item_names", "typed"]

# Decoding constraints of synthesis and the text retrievers. GRPO samples without them, so that its pi_old is the
# distribution its tokens were drawn from; the format and diversity terms teach K distinct lines instead.
CONSTRAINED_DECODING_FIELDS = {"no_repeat_ngram_size", "fill_k_lines"}


class FanoutSampling(BaseModel):
    """How the FOLM samples a fan-out."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.9, gt=0)
    max_new_tokens: int = Field(96, ge=1)
    no_repeat_ngram_size: int = Field(3, ge=0, description="no token n-gram twice in prompt and completion (0: off): "
                                                         "a small FOLM otherwise loops on one line")
    fill_k_lines: bool = Field(True, description="no end of sequence before K lines: a FOLM warm-started on shorter "
                                                 "sets (outfits of ~5 items) otherwise stops early")


class FolmTrainConfig(FanoutSampling):
    steps: int = Field(50, ge=1)
    group_size: int = Field(8, ge=2, description="G completions per query")
    per_step_queries: int = Field(2, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    epsilon: float = Field(0.2, gt=0, lt=1)
    beta_forward: float = Field(0.05, ge=0)
    beta_reverse: float = Field(0.05, ge=0)
    num_iterations: int = Field(2, ge=1, description="updates per sampled batch; >= 2 lets the KL terms act")
    k: int = Field(10, ge=1, description="sub-queries asked for in the prompt")
    lora_rank: int = Field(0, ge=0, description="0: full fine-tune")
    lora_alpha: int | None = None
    generation_batch_size: int = Field(16, ge=1)
    micro_batch_size: int = Field(8, ge=1, description="completions per forward/backward in the update")
    processes: int = Field(1, ge=1, description="data-parallel processes (GPUs, or CPU processes over gloo), each "
                                                "training its share of every step's completions")
    use_vllm: bool = Field(False, description="GPU: generate with vLLM colocated in the training process "
                                              "(TRL's use_vllm; needs the vllm package)")
    seed: int = 0
    save_every: int = Field(10, ge=1, description="steps between resumable checkpoints")


class SynthConfig(FanoutSampling):
    samples_per_query: int = Field(128, ge=1, description="S fan-outs sampled per training query")
    keep: Literal["top_fraction", "threshold"] = "top_fraction"
    keep_fraction: float = Field(0.25, gt=0, le=1)
    reward_threshold: float | None = None
    min_subqueries_fraction: float = Field(0.5, ge=0, le=1,
                                           description="fan-outs with fewer than this x K sub-queries are dropped")
    max_queries: int | None = None
    chunk_queries: int = Field(16, ge=1)
    batch_size: int = 32
    seed: int = 0


SamplerName = Literal["heun", "dpm2m", "sde"]
# how the networks that run per query (the query encoder, the diffusion denoiser) execute: see `runtime`
QueryRuntime = Literal["torch", "onnx"]


class SamplerSetting(BaseModel):
    """One way to sample a diffusion model: the solver and its step count."""

    model_config = ConfigDict(extra="forbid")

    sampler: SamplerName
    steps: int = Field(ge=1)


class NoiseSchedule(BaseModel):
    """Where noise levels come from: training draws (`kind`) and the sampler's range [sigma_min, sigma_max].

    sigma_max: rows are L2-normalised 128-d embeddings, so each coordinate has std ~1/sqrt(d) = 0.088
    (= sigma_data) and a whole (K, d) target has norm sqrt(K); two targets are at most 2 sqrt(K) ~ 6-7
    apart for K = 10-12. sigma_max must exceed that distance (Song & Ermon 2020, technique 1) so that
    N(0, sigma_max^2 I) hides which target a sample came from; 10 (~115 sigma_data, close to EDM's
    80 / 0.5 = 160 for images) does so for K up to 25. Larger values only spend steps on pure noise.

    p_mean: EDM's log-normal (-1.2, 1.2) is tuned for sigma_data = 0.5; shifting P_mean by
    ln(0.088 / 0.5) = -1.74 keeps the same noise-to-data ratio for our sigma_data.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["tangent", "lognormal"] = "tangent"
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(10.0, gt=0)
    p_mean: float = -2.9
    p_std: float = Field(1.2, gt=0)

    @model_validator(mode="after")
    def _check_range(self) -> NoiseSchedule:
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        return self


class DiffusionTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # Paper: 0.9999 over a long run. Short runs need a shorter horizon; the effective decay also ramps up
    # as min(ema_decay, (1 + step) / (10 + step)), so early averages are not dominated by the random init.
    ema_decay: float = Field(0.999, ge=0, lt=1)
    cfg_drop_prob: float = Field(0.1, ge=0, le=1)
    noise: NoiseSchedule = NoiseSchedule()
    permute_rows: bool = True  # the paper's augmentation: a set has no row order
    # True: the network generates each row as its offset from the condition (target - condition), which sampling adds
    # back. A fan-out's directions lie near their query (a sub-query carrying it, an item it reaches); generating
    # the offsets, a denoiser trained on a few hundred queries follows a new one instead of the ones it saw. Needs
    # one condition vector per set, of the targets' dimension (not MO-DiT's seed sequences).
    query_residual: bool = False
    seed: int = 0
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    device: str = "auto"
    # Data parallel: `processes` workers (GPUs, or CPU processes over gloo) share each global batch of `batch_size`;
    # the run is the same as in one process (same batches, averaged gradients), only faster.
    processes: int = Field(1, ge=1)


def deep_merge(base: dict, override: dict) -> dict:
    """`override` laid over `base`, nested mappings merged key by key (profiles, deployment YAML, overrides)."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged

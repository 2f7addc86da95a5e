"""MO-DiT+HPPO settings (SPEC §8): plain pydantic models, no torch, like `r4t_pipeline.config`.

The field defaults are the quality setting (a GPU, or a long CPU run); `MODIT_PROFILES` holds the smaller
`demo` (the 2-core CPU machine, minutes for both catalogs and all tasks) and `smoke` (tests, seconds).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from r4t_pipeline.config import DiffusionTrainConfig, NoiseSchedule, SamplerName, deep_merge
from r4t_pipeline.io import stable_hash

Protocol = Literal["item", "pattern"]
Split = Literal["train", "val", "test"]
Stage = Literal["raw", "ordered", "tail", "hppo"]
STAGES: tuple[Stage, ...] = ("raw", "ordered", "tail", "hppo")  # the paper's stages 1-4, in order
SPLITS: tuple[Split, ...] = ("train", "val", "test")

METHOD_LABELS = {
    "seed_centroid": "Seed centroid",
    "global_attribute": "Global attribute retrieval",
    "predicted_attribute": "Predicted-attribute retrieval (diagnostic)",
    "interpolation": "Best fixed interpolation",
    "pretrained": "Stage-1 pretrained generator",
    "ordered": "Metric-ordered CPT (stage 2)",
    "modit": "MO-DiT (stage 3)",
    "hppo": "MO-DiT+HPPO (stage 4)",
    "hppo_positives_only": "MO-DiT+HPPO query, positives only (diagnostic)",
}
BASELINES = ("seed_centroid", "global_attribute", "interpolation")  # the issue's; "best baseline" is one of them
STAGE_OF_METHOD = {"pretrained": "raw", "ordered": "ordered", "modit": "tail", "hppo": "hppo"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ThresholdRule(Strict):
    """Which known attribute values are positive: value >= threshold, where the threshold is the `quantile` of
    the task's known values, or `at_least`, or (both given: either rule qualifies) the lower of the two."""

    quantile: float | None = Field(0.75, gt=0, lt=1)
    at_least: float | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> ThresholdRule:
        if self.quantile is None and self.at_least is None:
            raise ValueError("a threshold rule needs a quantile, an at_least value, or both")
        return self


class PatternRule(Strict):
    """Patterns are FAISS k-means clusters of the task database's item embeddings, n_items / target_size of them.

    60 items per cluster on average: fine-grained (~150 patterns on Polyvore's ~8-9k items with likes or price,
    ~380 on the DJ demo subset's 22.6k tracks) yet larger than the largest K = 50 plus a seed set, so Purity@50 = 1
    is reachable, and a top-quartile (top-decile) attribute leaves ~15 (~6-8) positives per pattern: enough for a
    perfect Joint@10 in a typical pattern, so the metric measures the method rather than the pattern's size.
    """

    target_size: int = Field(60, ge=2)
    niter: int = Field(20, ge=1)
    seed: int = 0


class AttributeTask(Strict):
    """(catalog, attribute column, threshold rule, pattern rule). Items without a value for `column` are neither
    positive nor used as seeds, targets or predictor training data.

    database: which items the task clusters into patterns and retrieves from. `known` (default): the items with a
    value, since an item whose attribute is unknown can be judged neither a hit nor a miss (on Polyvore half the
    items, the official test split's, carry no likes or price). `all`: the whole catalog, unknowns counting as
    items without the attribute."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    domain: str
    column: str
    threshold: ThresholdRule = ThresholdRule()
    patterns: PatternRule = PatternRule()
    database: Literal["known", "all"] = "known"


def default_tasks(pattern_size: int = PatternRule().target_size) -> list[AttributeTask]:
    """The issue's three tasks: Polyvore likes and price (top quartile), DJ-mix track reuse (top decile or >= 3)."""
    patterns = PatternRule(target_size=pattern_size)
    return [
        AttributeTask(name="polyvore_likes", domain="polyvore", column="likes", threshold=ThresholdRule(quantile=0.75),
                      patterns=patterns),
        AttributeTask(name="polyvore_price", domain="polyvore", column="price", threshold=ThresholdRule(quantile=0.75),
                      patterns=patterns),
        # likes of a DJ-mix track = the number of mixes that play it; 3 is also its top decile on the demo subset
        AttributeTask(name="djmix_reuse", domain="djmix", column="likes",
                      threshold=ThresholdRule(quantile=0.9, at_least=3), patterns=patterns),
    ]


class SplitConfig(Strict):
    """Item-holdout: a random fraction of items (whatever their pattern); pattern-holdout: a random fraction of
    patterns with all their items. Seed sets of a split are drawn from that split's items only."""

    item_val_fraction: float = Field(0.1, ge=0, lt=1)
    item_test_fraction: float = Field(0.3, gt=0, lt=1)
    pattern_val_fraction: float = Field(0.1, ge=0, lt=1)
    pattern_test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _room_for_training(self) -> SplitConfig:
        for kind in ("item", "pattern"):
            held = getattr(self, f"{kind}_val_fraction") + getattr(self, f"{kind}_test_fraction")
            if held >= 0.9:
                raise ValueError(f"{kind}-holdout keeps {1 - held:.0%} of the data for training; hold out less")
        return self


class SeedSetConfig(Strict):
    """Seed sets: min_size..max_size items of one pattern, all known-valued and below the attribute threshold
    (low/medium attribute: room to improve), drawn per pattern and split with a fixed seed."""

    min_size: int = Field(3, ge=1)
    max_size: int = Field(5, ge=1)
    per_pattern: dict[Split, int] = Field(default_factory=lambda: {"train": 16, "val": 2, "test": 4})
    seed: int = 0

    @model_validator(mode="after")
    def _sizes(self) -> SeedSetConfig:
        if self.min_size > self.max_size:
            raise ValueError(f"seed sets: min_size {self.min_size} > max_size {self.max_size}")
        return self


class PredictorConfig(Strict):
    """The lightweight attribute predictor of stage 2: logistic regression (hidden = 0) or a 1-hidden-layer MLP
    on item embeddings, trained full-batch on the training split's known-valued items."""

    hidden: int = Field(0, ge=0)
    epochs: int = Field(300, ge=1)
    lr: float = Field(0.02, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    seed: int = 0


class SequenceConfig(Strict):
    """Stage datasets. Every condition is [task token, up to max_items item embeddings] with a mask.

    target: what the diffusion model generates. `offset` (default): the query minus the normalised centroid of the
    condition's items, the query being normalise(centroid + offset); the model learns where to move from the seeds
    and an untrained one stays at the seed centroid. `absolute`: the query embedding itself (the plain reading)."""

    max_items: int = Field(8, ge=1, description="condition items: a raw prefix, an ordered prefix or a seed set")
    target: Literal["offset", "absolute"] = "offset"
    raw_max_examples: int | None = Field(None, description="stage 1 (prefix, next item) pairs per domain; None: all")
    ordered_per_pattern: int = Field(32, ge=1, description="stage 2 ordered sequences per (task, pattern)")
    ordered_min_items: int = Field(2, ge=1, description="shortest ordered prefix")
    seed: int = 0


class SamplingConfig(Strict):
    """How the generators sample. steps = 1 returns the denoiser's estimate D(sigma_max n; sigma_max), the
    conditional mean of the target: the best single query when the target is (close to) a function of the seeds,
    as the tail centroid is. Chosen on validation: after the demo's training, Joint@10 (Polyvore likes,
    item-holdout, MO-DiT) was 0.216 at 1 step, 0.003 at 2, 0.031 at 4 and 0.138 at 8 (Heun: a few coarse steps
    amplify the denoiser's errors at small sigma). More steps sample the distribution (for several queries per
    seed set), and pay off only with a well-trained model."""

    sampler: SamplerName = "heun"
    steps: int = Field(1, ge=1)
    guidance: float = Field(0.0, ge=0)
    queries_per_seed_set: int = Field(1, ge=1, description="generated queries per seed set; neighbours interleaved")
    seed: int = 0


class HPPOConfig(Strict):
    """Stage 4. Candidate pool per training seed set: the seed centroid, the tail centroid of its pattern, the
    seed centroid moved along the task's attribute direction by each of `lambdas`, and `policy_samples` samples of
    the stage-3 model; each labelled by its online Joint@k / Purity@k (top-k search over the training items)."""

    k: int = Field(10, ge=1)
    lambdas: list[float] = Field(default_factory=lambda: [0.15, 0.3, 0.5, 0.8])
    policy_samples: int = Field(4, ge=0)
    pairs_per_seed_set: int = Field(4, ge=1)
    min_joint_gap: float = Field(0.1, gt=0, description="a winner beats its loser's Joint@k by at least this")
    pareto_filter: bool = Field(True, description="keep a pair only if the winner's Purity@k >= the loser's")
    max_seed_sets_per_task: int | None = None
    beta: float = Field(200.0, gt=0, description="scales the weighted denoising-error margin (see hppo.dpo_loss)")
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(5e-5, gt=0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(20, ge=1)
    device: str = "auto"


class ModitEvaluationConfig(Strict):
    ks: list[int] = Field(default_factory=lambda: [10, 50])
    lambdas: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5],
                                 description="grid for the best fixed interpolation (chosen on validation)")
    max_seed_sets: int | None = Field(None, description="test seed sets per task x protocol (fixed sample)")
    n_boot: int = Field(2000, ge=100)
    seed: int = 0


def _stage_train(**update) -> DiffusionTrainConfig:
    """sigma_max 3: a target is one row, an offset of norm < 1.5 from the seed centroid (or a unit vector), so two
    targets are at most ~3 apart (`NoiseSchedule`: sigma_max must exceed that); R4T's 10 covers K = 10 rows."""
    return DiffusionTrainConfig(**{"steps": 4000, "batch_size": 256, "lr": 3e-4, "warmup_steps": 100,
                                   "ema_decay": 0.999, "checkpoint_every": 500,
                                   "noise": NoiseSchedule(sigma_max=3.0), **update})


class ModitConfig(Strict):
    tasks: list[AttributeTask] = Field(default_factory=default_tasks)
    protocols: list[Protocol] = Field(default_factory=lambda: ["item", "pattern"])
    splits: SplitConfig = SplitConfig()
    seed_sets: SeedSetConfig = SeedSetConfig()
    predictor: PredictorConfig = PredictorConfig()
    sequences: SequenceConfig = SequenceConfig()
    denoiser_preset: Literal["smoke", "demo", "paper"] = "demo"
    denoiser_overrides: dict[str, int | float] = Field(default_factory=dict)
    raw: DiffusionTrainConfig = Field(default_factory=_stage_train)
    ordered: DiffusionTrainConfig = Field(default_factory=_stage_train)
    tail: DiffusionTrainConfig = Field(default_factory=lambda: _stage_train(steps=2000, lr=1e-4, warmup_steps=50))
    hppo: HPPOConfig = HPPOConfig()
    sampling: SamplingConfig = SamplingConfig()
    evaluation: ModitEvaluationConfig = ModitEvaluationConfig()

    @model_validator(mode="after")
    def _consistent(self) -> ModitConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")  # none: no MO-DiT branch
        if self.seed_sets.max_size > self.sequences.max_items:
            raise ValueError(f"seed sets of up to {self.seed_sets.max_size} items exceed sequences.max_items "
                             f"= {self.sequences.max_items}")
        return self

    def task(self, name: str) -> AttributeTask:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ValueError(f"unknown task {name!r}; configured tasks: {[t.name for t in self.tasks]}")

    @property
    def domains(self) -> list[str]:
        return list(dict.fromkeys(t.domain for t in self.tasks))

    def versions(self) -> dict[str, str]:
        """One hash per asset of the MO-DiT branch over the settings it reads (its Dagster code_version);
        upstream changes reach an asset through its inputs' data versions, not through this hash."""
        parts = {
            # a task's data also depends on its siblings on the same catalog (what they hold out, it cannot train on)
            **{f"task_data/{task.name}": [*(t for t in self.tasks if t.domain == task.domain), self.splits,
                                          self.seed_sets, self.predictor] for task in self.tasks},
            "raw": [self.sequences, self.denoiser_preset, self.denoiser_overrides, self.raw],
            "ordered": [self.sequences, self.ordered],
            "tail": [self.tail],
            "hppo": [self.hppo, self.sampling],
            "evaluation": [self.evaluation, self.sampling],
        }
        return {name: stable_hash([p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in values])
                for name, values in parts.items()}


# Measured on the 2-core CPU machine (see the MO-DiT section of the README/report): `demo` runs all four stages
# for both protocols and evaluates 3 tasks on both catalogs in a few minutes.
MODIT_PROFILES: dict[str, dict] = {
    "demo": {
        "denoiser_preset": "smoke",
        "seed_sets": {"per_pattern": {"train": 6, "val": 2, "test": 3}},
        "predictor": {"epochs": 200},
        "sequences": {"raw_max_examples": 12000, "ordered_per_pattern": 8},
        "raw": {"steps": 300, "batch_size": 128, "lr": 2e-3, "warmup_steps": 20, "ema_decay": 0.99,
                "checkpoint_every": 100, "log_every": 25},
        "ordered": {"steps": 300, "batch_size": 128, "lr": 2e-3, "warmup_steps": 20, "ema_decay": 0.99,
                    "checkpoint_every": 100, "log_every": 25},
        "tail": {"steps": 500, "batch_size": 128, "lr": 1e-3, "warmup_steps": 10, "ema_decay": 0.99,
                 "checkpoint_every": 100, "log_every": 25},
        # lr and steps chosen on validation Joint@10 (item-holdout): 1e-4 x 150 steps moved nothing, 1e-3 x 300
        # lowered purity, 3e-4 x 300 helped two of three tasks
        "hppo": {"policy_samples": 2, "pairs_per_seed_set": 3, "max_seed_sets_per_task": 600, "steps": 250,
                 "batch_size": 128, "lr": 3e-4, "warmup_steps": 10, "ema_decay": 0.95, "checkpoint_every": 50,
                 "log_every": 10},
        "evaluation": {"max_seed_sets": 400, "n_boot": 1000},
    },
    # the smoke catalogs hold a few hundred items: small patterns, small seed sets, larger pattern holdouts
    "smoke": {
        "tasks": [t.model_dump() for t in default_tasks(pattern_size=20)],
        "splits": {"pattern_val_fraction": 0.2, "pattern_test_fraction": 0.3},
        "denoiser_preset": "smoke",
        "seed_sets": {"min_size": 2, "max_size": 4, "per_pattern": {"train": 3, "val": 1, "test": 2}},
        "predictor": {"epochs": 50},
        "sequences": {"raw_max_examples": 400, "ordered_per_pattern": 2},
        "raw": {"steps": 6, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 2},
        "ordered": {"steps": 6, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 2},
        "tail": {"steps": 6, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 2},
        "hppo": {"policy_samples": 1, "pairs_per_seed_set": 2, "max_seed_sets_per_task": 40, "steps": 6,
                 "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 2},
        "evaluation": {"max_seed_sets": 30, "n_boot": 200},
    },
}


def modit_config(profile: str | None = None, overrides: dict | None = None) -> ModitConfig:
    """The quality defaults (profile None or "quality"), or a named profile, then explicit overrides."""
    if profile not in (None, "quality", *MODIT_PROFILES):
        raise ValueError(f"unknown MO-DiT profile {profile!r}; choose quality or one of {sorted(MODIT_PROFILES)}")
    base = MODIT_PROFILES.get(profile or "quality", {})
    return ModitConfig.model_validate(deep_merge(base, overrides or {}))

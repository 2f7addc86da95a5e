"""SetDenoiser: the raw network F of EDM, a DiT over the K noisy rows of a set.

Rows attend to each other (no positional encoding, so F is permutation-equivariant over rows), attend to
the condition tokens (one query embedding, or a padded sequence of seed-item embeddings, optionally with
learned token positions for ordered sequences), and are modulated by the noise level through adaLN-Zero
(Peebles & Xie 2023).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PRESETS: dict[str, dict[str, int | float]] = {
    # R4T paper, table 3.
    "paper": {"hidden": 1024, "mlp": 1024, "heads": 16, "layers": 6, "dropout": 0.1},
    # ~2 minutes of CPU training per model on ~5-20k targets of shape (10, 128).
    "demo": {"hidden": 128, "mlp": 256, "heads": 4, "layers": 3, "dropout": 0.0},
    # seconds: tests and pipeline smoke runs.
    "smoke": {"hidden": 64, "mlp": 128, "heads": 4, "layers": 2, "dropout": 0.0},
}


@dataclass(frozen=True)
class DenoiserConfig:
    dim: int = 128  # row dimension d
    cond_dim: int = 128  # condition token dimension d_c
    hidden: int = 128
    mlp: int = 256
    heads: int = 4
    layers: int = 3
    dropout: float = 0.0
    # > 0: a learned embedding per condition-token position, for ordered condition sequences (MO-DiT reads a
    # task token, then seed items ordered by predicted attribute). 0 (R4T): the condition is an unordered set.
    cond_positions: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "cond_dim", "hidden", "mlp", "heads", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"DenoiserConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.cond_positions < 0:
            raise ValueError(f"DenoiserConfig.cond_positions must be >= 0, got {self.cond_positions}")
        if self.hidden % self.heads:
            raise ValueError(f"DenoiserConfig.hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"DenoiserConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def preset(cls, name: Literal["paper", "demo", "smoke"], dim: int = 128, cond_dim: int = 128) -> DenoiserConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown denoiser preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(dim=dim, cond_dim=cond_dim, **PRESETS[name])

    def to_dict(self) -> dict[str, int | float]:
        """Every field; cond_positions only when used, so R4T configs (and their run fingerprints) stay as before."""
        fields = dataclasses.asdict(self)
        if not self.cond_positions:
            del fields["cond_positions"]
        return fields


def parameter_count(config: DenoiserConfig) -> int:
    """Number of trainable parameters, counted without allocating them (meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in SetDenoiser(config).parameters())


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention of `x` over `context` (itself when None); mask (B, M) is True where attended."""

    def __init__(self, hidden: int, context_dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(context_dim, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        (b, n, _), m = x.shape, context.shape[1]
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, m, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class DiTBlock(nn.Module):
    """[self-attention over rows, cross-attention to the condition, MLP], each adaLN-Zero modulated."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6) for _ in range(3))
        self.self_attn = Attention(cfg.hidden, cfg.hidden, cfg.heads, cfg.dropout)
        self.cross_attn = Attention(cfg.hidden, cfg.cond_dim, cfg.heads, cfg.dropout)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.mlp),
            nn.GELU(approximate="tanh"),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp, cfg.hidden),
        )
        # shift, scale, gate for each of the three sublayers; zero-initialised so each block starts as identity.
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 9 * cfg.hidden))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: Tensor, noise_emb: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        modulation = self.modulation(noise_emb)[:, None].chunk(9, dim=-1)
        shift1, scale1, gate1, shift2, scale2, gate2, shift3, scale3, gate3 = modulation
        norm1, norm2, norm3 = self.norms
        x = x + gate1 * self.self_attn(modulate(norm1(x), shift1, scale1))
        x = x + gate2 * self.cross_attn(modulate(norm2(x), shift2, scale2), context, context_mask)
        return x + gate3 * self.mlp(modulate(norm3(x), shift3, scale3))


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise = ln(sigma)/4, then an MLP.

    c_noise spans ~2 units (sigma in [0.002, 10]); frequencies 0.1..30 run from near-linear features to
    ones that resolve a ~10% change of sigma.
    """

    def __init__(self, hidden: int, features: int = 256):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(-1, 1.5, features // 2), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, c_noise: Tensor) -> Tensor:
        phase = c_noise[:, None] * self.freqs
        return self.mlp(torch.cat([phase.cos(), phase.sin()], dim=-1))


class SetDenoiser(nn.Module):
    """F(x (B, K, d); c_noise (B,), cond (B, d_c) or (B, L, d_c), cond_mask (B, L), drop_cond (B,)) -> (B, K, d).

    cond_mask is True where a condition token is present (False = padding). drop_cond is True where the
    condition is dropped (classifier-free guidance): those rows see only the learned null token.
    """

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_rows = nn.Linear(cfg.dim, cfg.hidden)
        self.embed_noise = NoiseEmbedding(cfg.hidden)
        # Always present as an extra key, so dropping (or fully padding) the condition leaves one token to
        # attend to; when the condition is dropped it is the only one.
        self.null_token = nn.Parameter(torch.randn(cfg.cond_dim))
        if cfg.cond_positions:
            # zero-initialised: training starts from the order-blind model and learns what order adds
            self.cond_position = nn.Parameter(torch.zeros(cfg.cond_positions, cfg.cond_dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))
        self.final_linear = nn.Linear(cfg.hidden, cfg.dim)
        for layer in (self.final_modulation[1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        cond: Tensor,
        cond_mask: Tensor | None = None,
        drop_cond: Tensor | None = None,
    ) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"x must have shape (B, K, {self.cfg.dim}), got {tuple(x.shape)}")
        context, context_mask = self.condition_tokens(cond, cond_mask, drop_cond, x.shape[0])
        noise_emb = self.embed_noise(c_noise)
        h = self.embed_rows(x)
        for block in self.blocks:
            h = block(h, noise_emb, context, context_mask)
        shift, scale = self.final_modulation(noise_emb)[:, None].chunk(2, dim=-1)
        return self.final_linear(modulate(self.final_norm(h), shift, scale))

    def condition_tokens(
        self, cond: Tensor, cond_mask: Tensor | None, drop_cond: Tensor | None, batch: int
    ) -> tuple[Tensor, Tensor]:
        """[null token, RMS-normalised condition tokens] (B, 1+L, d_c) and which of them are attended."""
        if cond.ndim == 2:
            cond = cond[:, None]
        if cond.ndim != 3 or cond.shape[0] != batch or cond.shape[-1] != self.cfg.cond_dim:
            raise ValueError(
                f"cond must have shape ({batch}, {self.cfg.cond_dim}) or ({batch}, L, {self.cfg.cond_dim}), "
                f"got {tuple(cond.shape)}"
            )
        keep = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)
        if cond_mask is not None:
            if cond_mask.shape != cond.shape[:2]:
                raise ValueError(f"cond_mask must have shape {tuple(cond.shape[:2])}, got {tuple(cond_mask.shape)}")
            keep = keep & cond_mask.bool()
        if drop_cond is not None:
            keep = keep & ~drop_cond.bool()[:, None]
        # Embeddings have tiny coordinates (~1/sqrt(d_c)); unit RMS puts them on the same scale as the null token.
        tokens = F.rms_norm(cond, (self.cfg.cond_dim,), eps=1e-6)
        if self.cfg.cond_positions:
            if tokens.shape[1] > self.cfg.cond_positions:
                raise ValueError(f"cond has {tokens.shape[1]} tokens, the denoiser knows {self.cfg.cond_positions} "
                                 "positions")
            tokens = tokens + self.cond_position[: tokens.shape[1]]
        context = torch.cat([self.null_token.expand(batch, 1, -1), tokens], dim=1)
        null_kept = torch.ones(batch, 1, dtype=torch.bool, device=cond.device)
        return context, torch.cat([null_kept, keep], dim=1)

"""EDM diffusion retriever over sets of embedding rows (pure PyTorch)."""

from r4t_pipeline.config import DiffusionTrainConfig, NoiseSchedule
from r4t_pipeline.diffusion.denoiser import PRESETS, DenoiserConfig, SetDenoiser, parameter_count
from r4t_pipeline.diffusion.edm import (
    EDMPrecond,
    dpm2m_sample,
    edm_loss,
    guided_denoiser,
    heun_sample,
    karras_sigmas,
    loss_weight,
    sde_sample,
)
from r4t_pipeline.diffusion.train import (
    DiffusionRetrieverModel,
    DiffusionTrainResult,
    train_diffusion,
)

__all__ = [
    "PRESETS",
    "DenoiserConfig",
    "DiffusionRetrieverModel",
    "DiffusionTrainConfig",
    "DiffusionTrainResult",
    "EDMPrecond",
    "NoiseSchedule",
    "SetDenoiser",
    "dpm2m_sample",
    "edm_loss",
    "guided_denoiser",
    "heun_sample",
    "karras_sigmas",
    "loss_weight",
    "parameter_count",
    "sde_sample",
    "train_diffusion",
]

"""EDM diffusion retriever over sets of embedding rows (PyTorch; sampling optionally in ONNX Runtime)."""

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
    OnnxPrecond,
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
    "OnnxPrecond",
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

"""Training, checkpointing and sampling of the EDM set-diffusion retriever.

Checkpoint directory (written atomically when training ends):
  model.safetensors   EMA weights of EDMPrecond (network + sigma_data buffer)
  config.json         denoiser config, sigma_data, num_rows, noise schedule, train config, steps
  training_state.pt   raw weights, EMA, optimizer, scheduler, step, RNG states, loss history
While training, `training_state.pt` is also written every `checkpoint_every` steps to `<out_dir>.partial/`,
from which an interrupted run resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from r4t_pipeline.config import DiffusionTrainConfig, NoiseSchedule, SamplerName
from r4t_pipeline.device import resolve_device
from r4t_pipeline.diffusion.denoiser import DenoiserConfig, SetDenoiser
from r4t_pipeline.diffusion.edm import (
    EDMPrecond,
    dpm2m_sample,
    edm_loss,
    guided_denoiser,
    heun_sample,
    sample_sigmas,
    sde_sample,
)
from r4t_pipeline.io import atomic_dir, atomic_file, stable_hash
from r4t_pipeline.tracking import LogFn

CHECKPOINT_FORMAT = "r4t-edm-set-diffusion/1"
SAMPLERS = {"heun": heun_sample, "dpm2m": dpm2m_sample, "sde": sde_sample}
# EDM's Heun default; DPM-Solver++(2M) matched Heun-18's quality at 8 (the demo report's sweep); the paper's SDE
DEFAULT_SAMPLER_STEPS = {"heun": 18, "dpm2m": 8, "sde": 256}


@dataclass
class DiffusionTrainResult:
    checkpoint_dir: Path
    final_loss: float  # exponential moving average of the batch loss
    sigma_data: float
    steps: int  # total optimizer steps behind the checkpoint
    steps_run: int  # steps run by this call (less than `steps` after a resume)
    seconds: float
    loss_history: list[float]  # batch loss of every step


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor: linear warmup to 1, then cosine decay to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _validated_inputs(
    targets: np.ndarray, conditions: np.ndarray, condition_mask: np.ndarray | None, cfg: DenoiserConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    targets = np.asarray(targets, dtype=np.float32)
    conditions = np.asarray(conditions, dtype=np.float32)
    if targets.ndim != 3 or targets.shape[0] == 0 or targets.shape[2] != cfg.dim:
        raise ValueError(f"targets must have shape (N>0, K, {cfg.dim}), got {targets.shape}")
    if conditions.ndim not in (2, 3) or conditions.shape[0] != targets.shape[0] or conditions.shape[-1] != cfg.cond_dim:
        raise ValueError(
            f"conditions must have shape ({targets.shape[0]}, {cfg.cond_dim}) or "
            f"({targets.shape[0]}, L, {cfg.cond_dim}), got {conditions.shape}"
        )
    for name, array in (("targets", targets), ("conditions", conditions)):
        if not np.isfinite(array).all():
            bad = int(np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))[0])
            raise ValueError(f"{name} row {bad} contains non-finite values")
    if condition_mask is not None:
        condition_mask = np.asarray(condition_mask, dtype=bool)
        if conditions.ndim != 3 or condition_mask.shape != conditions.shape[:2]:
            expected = conditions.shape[:2]
            raise ValueError(f"condition_mask must have shape (N, L) = {expected}, got {condition_mask.shape}")
    return targets, conditions, condition_mask


def run_fingerprint(targets: np.ndarray, conditions: np.ndarray, condition_mask: np.ndarray | None,
                    cfg: DenoiserConfig, tc: DiffusionTrainConfig, init_from: Path | None) -> str:
    """What a training run depends on: a saved state is resumed only by a run with the same fingerprint,
    so new targets or settings retrain instead of returning the old model."""
    digest = hashlib.sha256()
    for array in (targets, conditions, condition_mask):
        if array is not None:
            digest.update(np.ascontiguousarray(array).tobytes())
    settings = tc.model_dump(mode="json", exclude={"checkpoint_every", "log_every", "device", "processes"})
    return stable_hash([digest.hexdigest(), cfg.to_dict(), settings, str(init_from)], length=16)


def _resume_state(work_dir: Path, out_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The newest training state of this very run: an interrupted one's, else a finished one's."""
    for path in (work_dir / "training_state.pt", out_dir / "training_state.pt"):
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("fingerprint") == fingerprint:
                return state
    return None


def train_diffusion(
    targets: np.ndarray,
    conditions: np.ndarray,
    denoiser_config: DenoiserConfig,
    train_config: DiffusionTrainConfig,
    out_dir: Path,
    *,
    condition_mask: np.ndarray | None = None,
    init_from: Path | None = None,
    resume: bool = True,
    log_fn: LogFn | None = None,
) -> DiffusionTrainResult:
    """Train D(y; sigma, cond) on targets (N, K, d) given conditions (N, d_c) or seed sequences (N, L, d_c).

    condition_mask (N, L) marks present seed tokens. init_from starts from a finished checkpoint's EMA
    weights and sigma_data (staged training); it is ignored when resuming.

    Run under `accelerate launch` (see `diffusion.launch`), every process draws the same global batch and trains on
    its contiguous share; DDP averages the gradients, so the steps are those of one process on the whole batch.
    Only the main process writes checkpoints and calls `log_fn`.
    """
    from accelerate import Accelerator

    started = time.perf_counter()
    targets, conditions, condition_mask = _validated_inputs(targets, conditions, condition_mask, denoiser_config)
    tc = train_config
    if tc.query_residual:
        if conditions.ndim != 2 or conditions.shape[1] != targets.shape[2]:
            raise ValueError(f"query_residual: the conditions must be one vector per set of the targets' dimension "
                             f"({targets.shape[0]}, {targets.shape[2]}), got {conditions.shape}")
        targets = targets - conditions[:, None, :]  # the network learns the offsets; `sample` adds the condition
    out_dir = Path(out_dir)
    work_dir = out_dir.with_name(out_dir.name + ".partial")
    accelerator = Accelerator(cpu=resolve_device(tc.device).type == "cpu")
    device, world, main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    if tc.batch_size % world:
        raise ValueError(f"batch_size {tc.batch_size} does not split evenly over {world} processes")
    share = slice(accelerator.process_index * tc.batch_size // world, (accelerator.process_index + 1)
                  * tc.batch_size // world)
    if not resume and main:
        shutil.rmtree(work_dir, ignore_errors=True)
    fingerprint = run_fingerprint(targets, conditions, condition_mask, denoiser_config, tc, init_from)
    state = _resume_state(work_dir, out_dir, fingerprint) if resume else None

    torch.manual_seed(tc.seed)
    precond = EDMPrecond(SetDenoiser(denoiser_config), sigma_data=float(targets.std())).to(device)
    if init_from is not None and state is None:
        init = DiffusionRetrieverModel.load(init_from, device)
        if init.precond.net.cfg != denoiser_config:
            raise ValueError(f"init_from {init_from}: denoiser {init.precond.net.cfg} differs from {denoiser_config}")
        precond.load_state_dict(init.precond.state_dict())
    ema = copy.deepcopy(precond).requires_grad_(False)
    model = accelerator.prepare_model(precond)  # DistributedDataParallel over several processes, else precond
    params, ema_params = list(precond.parameters()), list(ema.parameters())
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.warmup_steps, tc.steps))
    generator = torch.Generator(device).manual_seed(tc.seed)
    step, loss_history, loss_ema = 0, [], math.nan
    if state is not None:
        if state["step"] > tc.steps:
            raise ValueError(f"saved run is at step {state['step']}, past train_config.steps={tc.steps}")
        precond.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, loss_history, loss_ema = state["step"], state["loss_history"], state["loss_ema"]

    def training_state() -> dict[str, Any]:
        saved = {
            "step": step,
            "model": precond.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "loss_history": loss_history,
            "loss_ema": loss_ema,
            "sigma_data": float(precond.sigma_data),
            "denoiser": denoiser_config.to_dict(),
            "num_rows": targets.shape[1],
            "fingerprint": fingerprint,
            "train": tc.model_dump(),
        }
        if device.type == "cuda":
            saved["cuda_rng"] = torch.cuda.get_rng_state(device)
        return saved

    y_all = torch.from_numpy(targets).to(device)
    c_all = torch.from_numpy(conditions).to(device)
    m_all = None if condition_mask is None else torch.from_numpy(condition_mask).to(device)
    first_step = step
    precond.train()
    with tqdm(total=tc.steps, initial=step, desc="diffusion", disable=None if main else True) as bar:
        while step < tc.steps:
            # the global batch, drawn alike in every process; each trains on its share
            idx = torch.randint(len(y_all), (tc.batch_size,), generator=generator, device=device)
            y = y_all[idx]
            if tc.permute_rows:
                perm = torch.rand(y.shape[:2], generator=generator, device=device).argsort(dim=1)
                y = y.gather(1, perm[..., None].expand_as(y))
            sigma = sample_sigmas(tc.noise, tc.batch_size, generator, device)
            noise = torch.randn(y.shape, generator=generator, device=device)
            drop = torch.rand(tc.batch_size, generator=generator, device=device) < tc.cfg_drop_prob
            mask = None if m_all is None else m_all[idx][share]
            loss = edm_loss(model, y[share], sigma[share], noise[share], c_all[idx][share], mask, drop[share]).mean()

            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip, foreach=True)
            optimizer.step()
            scheduler.step()
            decay = min(tc.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - decay)

            step += 1
            loss_value = accelerator.reduce(loss.detach(), "mean").item()  # the whole batch's loss
            loss_history.append(loss_value)
            loss_ema = loss_value if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss_value
            bar.update(1)
            if step % tc.checkpoint_every == 0 and step < tc.steps and main:
                with atomic_file(work_dir / "training_state.pt") as tmp:
                    torch.save(training_state(), tmp)
            if step % tc.log_every == 0 or step == tc.steps:
                bar.set_postfix(loss=f"{loss_ema:.4f}")
                if log_fn is not None and main:
                    metrics = {
                        "loss": loss_value,
                        "loss_ema": loss_ema,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                    }
                    log_fn(step, metrics)

    config = {
        "format": CHECKPOINT_FORMAT,
        "denoiser": denoiser_config.to_dict(),
        "sigma_data": float(precond.sigma_data),
        "num_rows": targets.shape[1],
        "noise": tc.noise.model_dump(),
        "train": tc.model_dump(),
        "steps": step,
    }
    if main:
        with atomic_dir(out_dir) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                      tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            torch.save(training_state(), tmp / "training_state.pt")
        shutil.rmtree(work_dir, ignore_errors=True)
    accelerator.wait_for_everyone()  # the others return once the checkpoint is there
    return DiffusionTrainResult(
        checkpoint_dir=out_dir,
        final_loss=loss_ema,
        sigma_data=float(precond.sigma_data),
        steps=step,
        steps_run=step - first_step,
        seconds=time.perf_counter() - started,
        loss_history=list(loss_history),
    )


class OnnxPrecond:
    """`EDMPrecond` in ONNX Runtime (see `r4t_pipeline.runtime`), called as the module is: D(x; sigma, cond,
    drop_cond). One condition token per set (R4T's query); seed sequences with masks (MO-DiT) run in PyTorch."""

    def __init__(self, precond: EDMPrecond, cache_dir: str | Path):
        from r4t_pipeline.runtime import OnnxModule

        cfg = precond.net.cfg
        example = (torch.zeros(2, 3, cfg.dim), torch.ones(2), torch.zeros(2, cfg.cond_dim),
                   torch.zeros(2, dtype=torch.bool))
        self.module = OnnxModule(_PrecondInputs(precond), example, ["x", "sigma", "cond", "drop_cond"],
                                 {"x": {0: "batch", 1: "rows"}, "sigma": {0: "batch"}, "cond": {0: "batch"},
                                  "drop_cond": {0: "batch"}}, cache_dir,
                                 threads=1)  # its ops are too small to split: waking a second thread costs more

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor,
                 cond_mask: torch.Tensor | None = None, drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond_mask is not None or cond.ndim != 2:
            raise ValueError("the ONNX denoiser takes one condition token per set; condition sequences run in PyTorch")
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(batch)
        drop = torch.zeros(batch, dtype=torch.bool) if drop_cond is None else drop_cond.bool()
        return self.module(x, sigma, cond, drop)


class _PrecondInputs(torch.nn.Module):
    """EDMPrecond with every input a tensor (sigma per set), as the exporter wants them."""

    def __init__(self, precond: EDMPrecond):
        super().__init__()
        self.precond = precond

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, drop_cond: torch.Tensor
                ) -> torch.Tensor:
        return self.precond(x, sigma, cond, None, drop_cond)


class DiffusionRetrieverModel:
    """A trained checkpoint ready to sample sets of K rows given conditions."""

    def __init__(self, precond: EDMPrecond, noise: NoiseSchedule, num_rows: int, query_residual: bool = False):
        self.precond = precond.eval()
        self.noise = noise
        self.num_rows = num_rows
        self.query_residual = query_residual  # the network generates offsets from the condition
        self.network: EDMPrecond | OnnxPrecond = self.precond  # what `sample` calls

    @property
    def device(self) -> torch.device:
        return self.precond.sigma_data.device

    @classmethod
    def load(cls, path: Path | str, device: str | torch.device = "auto",
             onnx_dir: str | Path | None = None) -> DiffusionRetrieverModel:
        """`onnx_dir`: sample with the network in ONNX Runtime on the CPU, exported to this folder once."""
        path = Path(path)
        device = resolve_device(device) if isinstance(device, str) else device
        if onnx_dir is not None:  # ONNX Runtime runs on the CPU; the sampler's tensors live there too
            device = torch.device("cpu")
        config = json.loads((path / "config.json").read_text())
        if config.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path / 'config.json'}: format is {config.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
        precond = EDMPrecond(SetDenoiser(DenoiserConfig(**config["denoiser"])), config["sigma_data"])
        precond.load_state_dict(load_file(path / "model.safetensors", device=str(device)))
        model = cls(precond.to(device), NoiseSchedule(**config["noise"]), config["num_rows"],
                    config["train"].get("query_residual", False))
        if onnx_dir is not None:
            model.network = OnnxPrecond(model.precond, onnx_dir)
        return model

    @torch.no_grad()
    def sample(
        self,
        conditions: np.ndarray | torch.Tensor,
        *,
        condition_mask: np.ndarray | torch.Tensor | None = None,
        sampler: SamplerName = "heun",
        steps: int | None = None,
        guidance: float = 0.1,
        seed: int = 0,
        num_rows: int | None = None,
        normalize: bool = True,
        batch_size: int = 1024,
    ) -> np.ndarray:
        """Sample (B, K, d) given conditions (B, d_c) or (B, L, d_c); rows L2-normalised unless normalize=False
        (a `query_residual` model's offsets come back added to their condition).

        The same seed (and batch_size) gives identical samples on the same device.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        cond = torch.as_tensor(conditions, dtype=torch.float32, device=self.device)
        mask = None if condition_mask is None else torch.as_tensor(condition_mask, dtype=torch.bool, device=self.device)
        num_rows = num_rows or self.num_rows
        generator = torch.Generator(self.device).manual_seed(seed)
        chunks = []
        for start in range(0, len(cond), batch_size):
            part = slice(start, start + batch_size)
            denoise = guided_denoiser(self.network, cond[part], None if mask is None else mask[part], guidance)
            chunks.append(
                SAMPLERS[sampler](
                    denoise,
                    (len(cond[part]), num_rows, self.precond.net.cfg.dim),
                    steps=steps or DEFAULT_SAMPLER_STEPS[sampler],
                    sigma_min=self.noise.sigma_min,
                    sigma_max=self.noise.sigma_max,
                    generator=generator,
                    device=self.device,
                )
            )
        samples = torch.cat(chunks)
        if self.query_residual:
            samples = samples + cond[:, None, :]
        return (F.normalize(samples, dim=-1) if normalize else samples).cpu().numpy()

"""The networks that run once per query (the query encoder, the diffusion denoiser) in ONNX Runtime.

A service answers small batches: 1-32 queries of ~10 tokens, 10 rows of a 3-layer denoiser. There eager PyTorch on
the CPU spends most of its time dispatching ops from Python; ONNX Runtime runs the same graph with fused kernels and
no interpreter in the loop (2-core CPU, one thread, batch 8: MiniLM 28 -> 16 ms, one denoiser call 4.4 -> 2.0 ms;
batch 1: 12.5 -> 3.8 ms and 2.5 -> 0.5 ms), with the same outputs to ~1e-7. A module is exported once by
PyTorch's own exporter (`torch.onnx.export`, dynamo) to a file named by its weights, so a new checkpoint gets a new
file and a second process loads the first one's. sentence-transformers' `backend="onnx"` would do the encoder's part
but needs optimum-onnx, which pins transformers < 4.58.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn


def _fingerprint(module: nn.Module, names: Sequence[str], example: Sequence[Tensor]) -> str:
    digest = hashlib.sha256(f"{type(module).__qualname__}|{torch.__version__}|{list(names)}|".encode())
    for tensor in example:
        digest.update(f"{tensor.dtype}{tensor.ndim}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class OnnxModule:
    """`module(*inputs)` (tensors in, one tensor out) run by ONNX Runtime on the CPU, with `dynamic` dimensions
    (input name -> {axis: label}) free at run time. The example inputs fix everything else; a dynamic axis needs an
    example size of at least 2 (the exporter specialises a size of 1). `threads`: intra-op threads (default:
    torch's)."""

    def __init__(self, module: nn.Module, example: Sequence[Tensor], names: Sequence[str],
                 dynamic: dict[str, dict[int, str]], cache_dir: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        self.names = list(names)
        path = Path(cache_dir) / f"{type(module).__name__}-{_fingerprint(module, names, example)}.onnx"
        if not path.exists():
            _export(module, example, self.names, dynamic, path)
        options = ort.SessionOptions()
        # default: as many threads as torch was given (`r4t serve` keeps one core for its event loop)
        options.intra_op_num_threads = options.inter_op_num_threads = threads or torch.get_num_threads()
        # no spinning between runs: a spinning worker holds a core that torch's and FAISS's threads wait for
        # (the sampler's steps and the search run between two calls)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, *inputs: Tensor) -> Tensor:
        feed = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in zip(self.names, inputs)}
        return torch.from_numpy(self.session.run(None, feed)[0])


def _export(module: nn.Module, example: Sequence[Tensor], names: list[str], dynamic: dict[str, dict[int, str]],
            path: Path) -> None:
    """To a temporary file, then renamed: a reader never sees half a model (and concurrent exporters agree)."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = tuple({axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in dynamic.get(n, {}).items()}
                   or None for n in names)
    cpu = copy.deepcopy(module).cpu().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*")  # two inputs sharing a dynamic axis is intended
        program = torch.onnx.export(cpu, tuple(t.cpu() for t in example), input_names=names, dynamic_shapes=shapes,
                                    dynamo=True, verbose=False, optimize=False)
    try:
        program.save(str(partial), external_data=False)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)  # a failed save leaves nothing behind

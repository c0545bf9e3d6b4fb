"""The device, the dtype and the compiled path: which GPU a process uses, the precision, and
how the UNet and ControlNet are compiled (torch.compile, CUDA graphs included)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

# The torch.compile modes that capture CUDA graphs: a graph's outputs live in memory its next
# replay overwrites (see `compile_module`).
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})

# Graphs dynamo may keep per compiled function (its default, 8, is shared by every model of a
# class: two models at POSEGEN_MAX_BATCH 4, with and without guidance, pass it).
RECOMPILE_LIMIT = 64

log = logging.getLogger(__name__)


def leaves_cpu_time(device: str, torch_threads: int) -> bool:
    """Whether the CPU has time to spare while the model runs: on a GPU, or on torch threads
    (0: one per core) that leave a core free."""
    if not device.startswith("cpu"):
        return True
    return 0 < torch_threads < (os.cpu_count() or 1)


def pick_device(setting: str, process_index: int) -> str:
    import torch

    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and torch.cuda.device_count() > 1:
        return f"cuda:{process_index % torch.cuda.device_count()}"
    return setting


def pick_dtype(setting: str, device: str) -> Any:
    import torch

    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[setting]


@dataclass(frozen=True)
class CompileOptions:
    """How a module's forward is compiled: torch.compile's mode, and whether its calls mark
    a step of the denoising loop (CUDA graph modes; see `compile_module`)."""

    mode: str
    backend: str = "inductor"

    @property
    def cuda_graphs(self) -> bool:
        return self.mode in CUDA_GRAPH_MODES

    def kwargs(self) -> dict[str, Any]:
        """torch.compile's arguments. Shapes stay static at first: a second batch size
        compiles one kernel for every size (the batch dimension dynamic), and in the CUDA
        graph modes each size then records a graph of its own (quick, no compile)."""
        return {"mode": self.mode, "backend": self.backend, "fullgraph": False}


def configure_dynamo() -> None:
    """Room for the graphs a worker compiles (each model, batch size, guidance on or off) and
    a warning of ours when dynamo passes its limit anyway: from then on that function's new
    shapes run uncompiled, which dynamo itself only logs once, among its own messages."""
    import torch._dynamo.config as config

    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(
        config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT
    )
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(f, _LimitWarning) for f in dynamo_log.filters):
        dynamo_log.addFilter(_LimitWarning())


class _LimitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("torch._dynamo hit config."):
            log.warning(
                "compile limit hit: calls of new shapes run uncompiled",
                extra={"limit": record.getMessage().splitlines()[0]},
            )
        return True


def compile_module(module: Any, options: CompileOptions, *, starts_step: bool) -> Any:
    """Compile the module's `forward` in place; the module stays what it is (diffusers
        looks through neither a wrapper nor an OptimizedModule for a ControlNet's config).

        In the CUDA graph modes a replay writes its outputs into the memory the graph recorded
        them in, so the next replay of the same graph overwrites what the last one returned. In
        a denoising loop the ControlNet's residuals of step n are still read by the UNet of
        step n when torch's graph trees start step n+1's recording or replay on a later call;
        and the UNet's output goes to the scheduler, which may keep it across steps (PNDM's
        `ets`, and without classifier-free guidance no arithmetic copies it first). So the
        module that `starts_step` (the first compiled one each step calls: the ControlNet)
        marks the step's start (`torch.compiler.cudagraph_mark_step_begin`: the previous step's
        outputs are dead), and every compiled module's outputs are cloned, so that what the
        pipeline keeps of them is its own memory whatever graph runs next.
    Hooks run outside the compiled code."""
    import torch

    module.forward = torch.compile(module.forward, **options.kwargs())
    if options.cuda_graphs:
        if starts_step:
            module.register_forward_pre_hook(_mark_step)
        module.register_forward_hook(_clone_outputs)
    return module


def _mark_step(_module: Any, _args: Any) -> None:
    import torch

    torch.compiler.cudagraph_mark_step_begin()


def _clone_outputs(_module: Any, _args: Any, output: Any) -> Any:
    return _cloned(output)


def _cloned(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_cloned(v) for v in value)
    if hasattr(value, "to_tuple"):  # a diffusers BaseOutput (a dict-like dataclass)
        return type(value)(**{k: _cloned(v) for k, v in value.items()})
    return value

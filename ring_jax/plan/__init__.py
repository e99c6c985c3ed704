"""Will it fit? Ahead-of-time compilation of the experiment's programs for a TPU topology.

With ``libtpu`` installed (``pip install -e ".[tpu-aot]"``; no TPU needed), XLA's TPU compiler
and partitioner run on a CPU machine against a described slice
(`jax.experimental.topologies`). `plan` compiles the run's own programs (`programs`: the RL
train step, its forward alone, the engine's prefill and decode) with the run's shardings on a
mesh over that slice and reports, per device, the memory XLA assigned, whether it fits the
chip's HBM, FLOPs and bytes from the cost analysis, and the compile time (`report`).

    python -m ring_jax.plan --config=experiments/pod_scale.py:ling_mini_2 \\
        --topology=v5p:4x4x4 --mesh=fsdp=4,expert=16 --program=all --num_layers=2

``num_layers`` compiles shallower copies (depths N and N + 1) and extrapolates linearly to the
model's depth (`report.extrapolate`), which keeps big presets' compiles to minutes.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from ring_jax import sharding
from ring_jax.plan import hardware, programs, report
from ring_jax.plan.report import ProgramReport


def with_depth(cfg: Any, num_layers: int) -> Any:
    """``cfg`` with a model of ``num_layers`` blocks (engine/scheduler unchanged)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=num_layers))


def compile_program(name: str, cfg: Any, meshes: programs.Meshes) -> ProgramReport:
    """Lowers and compiles one registered program; reads its memory and cost."""
    program = programs.PROGRAMS[name](cfg, meshes)
    start = time.perf_counter()
    with sharding.use_mesh(program.mesh):
        compiled = program.fn.lower(*program.args).compile()
    return report.from_compiled(name, cfg.model.num_layers, compiled,
                                time.perf_counter() - start)


def plan(cfg: Any, meshes: programs.Meshes, names: Sequence[str],
         num_layers: int | None = None) -> list[ProgramReport]:
    """One report per program; with ``num_layers`` < the model's depth, extrapolated from
    compiles at depths ``num_layers`` and ``num_layers + 1``."""
    full = cfg.model.num_layers
    out = []
    for name in names:
        if num_layers is None or num_layers >= full:
            out.append(compile_program(name, cfg, meshes))
            continue
        shallow = compile_program(name, with_depth(cfg, num_layers), meshes)
        deeper = compile_program(name, with_depth(cfg, num_layers + 1), meshes)
        out.append(report.extrapolate(shallow, deeper, full))
    return out


def check_depth(cfg: Any, num_layers: int) -> None:
    """Depths N and N + 1 must both contain an MoE block, so each extra layer is one more of
    the same (dense first layers would make the per-layer slope wrong)."""
    from ring_jax.config import ConfigError
    lowest = cfg.model.first_k_dense_replace + 1 if cfg.model.is_moe else 1
    if num_layers < lowest:
        raise ConfigError(f"num_layers={num_layers} is invalid: must be >= {lowest} (the "
                          f"{cfg.model.first_k_dense_replace} dense first layer(s) + one MoE "
                          "layer, so the depth extrapolation adds MoE layers only)")


__all__ = ["plan", "compile_program", "check_depth", "with_depth", "hardware", "programs",
           "report", "ProgramReport"]

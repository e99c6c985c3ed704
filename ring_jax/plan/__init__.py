"""Will it fit? Ahead-of-time compilation of the experiment's programs for a TPU topology.

With ``libtpu`` installed (``pip install -e ".[tpu-aot]"``; no TPU needed), XLA's TPU compiler
and partitioner run on a CPU machine against a described slice
(`jax.experimental.topologies`). `plan` compiles the run's own programs (`programs`: the RL
train step, its forward alone, the engine's prefill and decode) with the run's shardings on a
mesh over that slice and reports, per device, the memory XLA assigned, whether it fits the
chip's HBM, FLOPs and bytes from the cost analysis, and the compile time (`report`).

    python -m ring_jax.plan --config=experiments/pod_scale.py:ling_mini_2 \\
        --topology=v5p:4x4x4 --mesh=fsdp=4,expert=16 --program=all --num_layers=3

``num_layers`` compiles shallower copies (depths N and N + 1) and extrapolates linearly to the
model's depth (`report.extrapolate`), which keeps big presets' compiles to minutes.
``dump_dir`` keeps XLA's own account of each compile (``xla_dump_to``: the optimized HLO, the
buffer assignment and ``*memory-usage-report.txt``, the buffers live at the peak, largest
first), one folder per program and depth: what to read when a program does not fit.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

from absl import logging

from ring_jax import sharding
from ring_jax.plan import hardware, programs, report
from ring_jax.plan.report import ProgramReport


def with_depth(cfg: Any, num_layers: int) -> Any:
    """``cfg`` with a model of ``num_layers`` blocks (engine/scheduler unchanged)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=num_layers))


def dump_options(dump_dir: str | None, name: str, num_layers: int) -> dict[str, Any] | None:
    """XLA compiler options that dump this compile to ``dump_dir/<name>_L<num_layers>``."""
    if not dump_dir:
        return None
    return {"xla_dump_to": os.path.join(dump_dir, f"{name}_L{num_layers}")}


def compile_program(name: str, cfg: Any, meshes: programs.Meshes,
                    dump_dir: str | None = None) -> ProgramReport:
    """Lowers and compiles one registered program; reads its memory and cost (and, with
    ``dump_dir``, leaves XLA's dump of the compile there: `dump_options`)."""
    program = programs.PROGRAMS[name](cfg, meshes)
    depth = cfg.model.num_layers
    start = time.perf_counter()
    with sharding.use_mesh(program.mesh):
        compiled = program.fn.lower(*program.args).compile(
            compiler_options=dump_options(dump_dir, name, depth))
    out = report.from_compiled(name, depth, compiled, time.perf_counter() - start)
    logging.info("compiled %s at %d layers in %.0f s: argument %.3g, temp %.3g, peak %.3g GiB",
                 name, depth, out.compile_s, out.argument / report.GiB, out.temp / report.GiB,
                 out.peak / report.GiB)
    return out


def plan(cfg: Any, meshes: programs.Meshes, names: Sequence[str],
         num_layers: int | None = None, dump_dir: str | None = None) -> list[ProgramReport]:
    """One report per program; with ``num_layers`` < the model's depth, extrapolated from
    compiles at depths ``num_layers`` and ``num_layers + 1``."""
    full = cfg.model.num_layers
    out = []
    for name in names:
        if num_layers is None or num_layers >= full:
            out.append(compile_program(name, cfg, meshes, dump_dir))
            continue
        shallow = compile_program(name, with_depth(cfg, num_layers), meshes, dump_dir)
        deeper = compile_program(name, with_depth(cfg, num_layers + 1), meshes, dump_dir)
        out.append(report.extrapolate(shallow, deeper, full))
    return out


# Programs whose forward runs the MoE layers as one scan under `model.scan_layers` (the
# full-sequence ones; the engine's prefill and decode carry a KV cache and keep the loop).
SCANNED_PROGRAMS = ("rl_step", "logprob")


def check_depth(cfg: Any, num_layers: int, names: Sequence[str] = ()) -> None:
    """Depths N and N + 1 must both contain an MoE block, so each extra layer is one more of
    the same (dense first layers would make the per-layer slope wrong); with
    `model.scan_layers`, a scanned program needs two MoE layers at depth N (a scan of one layer
    compiles differently: Ling-1T's depth-2 temporaries exceed depth 3's)."""
    from ring_jax.config import ConfigError
    first = cfg.model.first_k_dense_replace
    lowest, why = (first + 1, f"the {first} dense first layer(s) + one MoE layer, so the "
                   "depth extrapolation adds MoE layers only") if cfg.model.is_moe else (1, "")
    scanned = [n for n in names if n in SCANNED_PROGRAMS]
    if cfg.model.is_moe and cfg.model.scan_layers and scanned:
        lowest, why = first + 2, (f"the {first} dense first layer(s) + two MoE layers: "
                                  f"{scanned} scan the MoE layers (model.scan_layers)")
    if num_layers < lowest:
        raise ConfigError(f"num_layers={num_layers} is invalid: must be >= {lowest} ({why})")


__all__ = ["plan", "compile_program", "check_depth", "with_depth", "dump_options", "hardware",
           "programs", "report", "ProgramReport"]

"""Memory per device under the two engine placements (`multihost.EngineMeshConfig`).

The run keeps the trainer's state (params, AdamW moments, router bias) and the engine's state
(inference weights, KV cache and slot rows) alive for its whole length, so what a device holds
depends on who shares it:

  colocated       every device holds both states; while the trainer steps the engine's state
                  sits idle beside it, and while the engine decodes the train state does:

                      peak = max(rl_step.peak + engine_state, engine_program.peak + train_state)

                  with engine_state = the decode program's arguments (weights + slots) and
                  train_state = the RL step's arguments (state + one batch);
  disaggregated   the trainer's devices run only the RL step (rl_step.peak), the engine's only
                  prefill / decode (their largest peak): the paper's hybrid runtime, at the
                  price of devices that idle while the other side works.

A program's per-device memory depends on its mesh's shape, not on which devices it covers, so
each program compiles once and both placements read the same reports.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from ring_jax.plan.report import GiB, ProgramReport

ENGINE_PROGRAMS = ("prefill", "decode")


@dataclasses.dataclass(frozen=True)
class PlacementRow:
    """Peak bytes per device of each device group under one placement."""

    placement: str
    num_train_devices: int
    num_engine_devices: int
    train_peak: float  # the trainer's devices (colocated: every device)
    engine_peak: float  # the engine's devices (colocated: the same devices, the same number)

    def fits(self, hbm_bytes: float, headroom: float = 0.95) -> bool:
        return max(self.train_peak, self.engine_peak) <= headroom * hbm_bytes


def placement_rows(reports: Mapping[str, ProgramReport], num_train_devices: int,
                   num_engine_devices: int) -> list[PlacementRow]:
    """Both placements from the RL step's report and the engine programs' (module docstring);
    needs ``rl_step`` and at least one of ``prefill`` / ``decode``."""
    missing = [] if "rl_step" in reports else ["rl_step"]
    engine = [reports[n] for n in ENGINE_PROGRAMS if n in reports]
    if not engine:
        missing.append("prefill or decode")
    if missing:
        raise ValueError(f"placement memory needs the {' and '.join(missing)} program(s)")
    step = reports["rl_step"]
    engine_peak = max(r.peak for r in engine)
    engine_state = reports["decode"].argument if "decode" in reports else engine[0].argument
    colocated = max(step.peak + engine_state, engine_peak + step.argument)
    return [PlacementRow("colocated", num_train_devices, num_train_devices, colocated,
                         colocated),
            PlacementRow("disaggregated", num_train_devices, num_engine_devices, step.peak,
                         engine_peak)]


def format_table(rows: Sequence[PlacementRow], hbm_bytes: float, headroom: float = 0.95) -> str:
    """A markdown table, one row per placement, GiB per device."""
    out = ["| placement | trainer devices | engine devices | trainer device peak GiB | "
           f"engine device peak GiB | fits {hbm_bytes / GiB:.0f} GiB |", "|" + "---|" * 6]
    for r in rows:
        engine_devices = "the same" if r.placement == "colocated" else str(r.num_engine_devices)
        out.append(f"| {r.placement} | {r.num_train_devices} | {engine_devices} | "
                   f"{r.train_peak / GiB:.3g} | {r.engine_peak / GiB:.3g} | "
                   f"{'yes' if r.fits(hbm_bytes, headroom) else '**no**'} |")
    return "\n".join(out)

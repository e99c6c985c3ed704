"""What a compiled program needs per device, whether it fits, and the depth extrapolation.

Memory comes from XLA's buffer assignment (`Compiled.memory_analysis()`), per device:

    peak = arguments + outputs - aliased + temporaries + generated code

(aliased: output buffers that reuse a donated argument's). This is what the program holds while
it runs; the runtime adds a little on top (the planner reports a program as fitting when the
peak is at most ``headroom`` of the chip's HBM, 95% by default).

Depth extrapolation (``--num_layers=N``): every layer past ``first_k_dense_replace`` is the same
MoE block, so every byte count and the FLOPs are affine in the depth L. The planner compiles
depths N and N + 1 and extrapolates each figure f to the full depth:

    f(L) = f(N) + (L - N) · max(0, f(N + 1) - f(N))

Exact for the arguments (parameters, optimizer state, cache); for temporaries it assumes XLA's
schedule keeps the per-layer footprint constant, which a compile at full depth can confirm. A
layer never frees memory: a negative difference (XLA packed the deeper program's temporaries
tighter; seen on Ling-1T at moe_token_chunk 64, 8.01 then 7.82 GiB) is heap-layout noise, and
the figure stays at its depth-N value rather than shrinking towards zero or below.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

GiB = 2**30

MEMORY_FIELDS = ("argument", "output", "alias", "temp", "code")


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program's per-device needs (bytes, FLOPs) and its compile time."""

    program: str
    num_layers: int
    argument: float
    output: float
    alias: float
    temp: float
    code: float
    flops: float
    bytes_accessed: float
    compile_s: float
    extrapolated_from: tuple[int, ...] = ()  # the compiled depths, when extrapolated
    temp_per_layer: float = 0.0  # temporaries added by one more layer, when extrapolated

    @property
    def peak(self) -> float:
        return self.argument + self.output - self.alias + self.temp + self.code

    def fits(self, hbm_bytes: float, headroom: float = 0.95) -> bool:
        return self.peak <= headroom * hbm_bytes


def from_compiled(program: str, num_layers: int, compiled: Any,
                  compile_s: float) -> ProgramReport:
    """Reads `memory_analysis()` and `cost_analysis()` of a `jax.stages.Compiled`."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    cost = cost or {}
    return ProgramReport(
        program=program, num_layers=num_layers,
        argument=float(mem.argument_size_in_bytes), output=float(mem.output_size_in_bytes),
        alias=float(mem.alias_size_in_bytes), temp=float(mem.temp_size_in_bytes),
        code=float(mem.generated_code_size_in_bytes), flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)), compile_s=compile_s)


def extrapolate(shallow: ProgramReport, deeper: ProgramReport, num_layers: int
                ) -> ProgramReport:
    """The report at ``num_layers`` from compiles at two consecutive depths (module docstring)."""
    if deeper.num_layers != shallow.num_layers + 1:
        raise ValueError(f"need depths N and N + 1, got {shallow.num_layers} and "
                         f"{deeper.num_layers}")
    extra = num_layers - shallow.num_layers

    def line(name: str) -> float:
        a, b = getattr(shallow, name), getattr(deeper, name)
        return a + extra * max(b - a, 0.0)

    fields = {name: line(name) for name in (*MEMORY_FIELDS, "flops", "bytes_accessed")}
    return ProgramReport(program=shallow.program, num_layers=num_layers, **fields,
                         compile_s=shallow.compile_s + deeper.compile_s,
                         extrapolated_from=(shallow.num_layers, deeper.num_layers),
                         temp_per_layer=deeper.temp - shallow.temp)


def _gib(x: float) -> str:
    return f"{x / GiB:.3g}"


def format_table(reports: Sequence[ProgramReport], hbm_bytes: float, headroom: float = 0.95
                 ) -> str:
    """A markdown table, one row per program, sizes in GiB per device; an extrapolated row
    names its compiled depths and the temporaries one more layer adds (what must stay small
    for a deep model to fit)."""
    head = ("| program | layers | argument | output | alias | temp | code | peak GiB | "
            f"fits {hbm_bytes / GiB:.0f} GiB | TFLOPs | GB accessed | compile s |")
    rows = [head, "|" + "---|" * 12]
    for r in reports:
        layers = str(r.num_layers)
        if r.extrapolated_from:
            taken = ", taken as 0" if r.temp_per_layer < 0 else ""
            layers += (f" (fit of {r.extrapolated_from[0]}, {r.extrapolated_from[1]}; temp "
                       f"{r.temp_per_layer / GiB:+.3g} per layer{taken})")
        rows.append(
            f"| {r.program} | {layers} | {_gib(r.argument)} | {_gib(r.output)} | "
            f"{_gib(r.alias)} | {_gib(r.temp)} | {_gib(r.code)} | {_gib(r.peak)} | "
            f"{'yes' if r.fits(hbm_bytes, headroom) else '**no**'} | {r.flops / 1e12:.3g} | "
            f"{r.bytes_accessed / 1e9:.3g} | {r.compile_s:.1f} |")
    return "\n".join(rows)

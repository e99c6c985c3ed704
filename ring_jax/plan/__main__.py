"""``python -m ring_jax.plan --config=FILE[:ARG] --topology=v5p:4x4x4 --mesh=fsdp=4,expert=16``

Compiles the experiment's programs ahead of time for the TPU topology and prints one table
(sizes in GiB per device; see `ring_jax.plan`). Flags:

  --program          rl_step | logprob | prefill | decode | all (comma-separated list allowed)
  --mesh             the training mesh, axis=size over (data, fsdp, expert, tensor); default:
                     the config's ``mesh`` section resolved over the topology's devices
  --engine_mesh      the engine's mesh (default: the config's mesh.engine sizes, else the
                     training mesh); colocated it takes the topology's first devices (data=4 =
                     one v5p host's chips: the per-host layout), disaggregated its last ones
  --placement        colocated | disaggregated | both (default: the config's
                     mesh.engine.placement): with rl_step and an engine program compiled, a
                     second table of memory per device under each placement (`plan.placement`)
  --num_layers       compile depths N and N + 1 and extrapolate to the model's depth
  --allow_split_physical_axes   accept mesh axes that split the physical torus (or the
                     config's mesh.allow_split_physical_axes)
  --dump_dir         keep XLA's dump of every compile under DIR/<program>_L<depth> (optimized
                     HLO, buffer assignment, *memory-usage-report.txt: the buffers at the peak)
  --headroom         fraction of HBM a program may use to count as fitting (default 0.95)
  --config.a.b=v     any config override, as for ring_jax.main
"""
from __future__ import annotations

import os
import sys

# The planner compiles and never runs a program: JAX's own backend stays the CPU (set before the
# config file, which imports JAX, is loaded at flag parsing).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags
from ml_collections import config_flags

from ring_jax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (with :arg).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:4x4x4.")
_MESH = flags.DEFINE_string("mesh", "", "Training mesh, e.g. fsdp=8,expert=8.")
_ENGINE_MESH = flags.DEFINE_string("engine_mesh", "", "Engine mesh (default: training mesh).")
_PLACEMENT = flags.DEFINE_enum("placement", None, ["colocated", "disaggregated", "both"],
                               "Engine placement(s) to report memory for.")
_PROGRAM = flags.DEFINE_string("program", "all", "rl_step,logprob,prefill,decode or all.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", None, "Compile this depth and one more, "
                                   "extrapolate to the model's depth.")
_SPLIT = flags.DEFINE_bool("allow_split_physical_axes", False,
                           "Accept mesh axes that split physical torus axes.")
_HEADROOM = flags.DEFINE_float("headroom", 0.95, "Fraction of HBM a program may use.")
_DUMP_DIR = flags.DEFINE_string("dump_dir", None, "Keep XLA's dump of each compile here.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from ring_jax import plan
    from ring_jax.plan import hardware, placement, programs, report
    from ring_jax.rollout import layout
    from ring_jax.train import experiment
    try:
        cfg = experiment.from_config_dict(_CONFIG.value)
        names = list(programs.PROGRAMS) if _PROGRAM.value == "all" else _PROGRAM.value.split(",")
        unknown = [n for n in names if n not in programs.PROGRAMS]
        if unknown:
            raise ConfigError(f"program={_PROGRAM.value!r} is invalid: must be 'all' or a "
                              f"comma-separated list of {list(programs.PROGRAMS)}")
        if _NUM_LAYERS.value is not None:
            plan.check_depth(cfg, _NUM_LAYERS.value, names)
        hardware.parse_topology_name(_TOPOLOGY.value)
        topology = hardware.get_topology(_TOPOLOGY.value)
        sizes = (hardware.parse_mesh(_MESH.value) if _MESH.value
                 else cfg.mesh.resolve(len(topology.devices)))
        split = _SPLIT.value or cfg.mesh.allow_split_physical_axes
        train_mesh = hardware.make_mesh(topology, sizes, allow_split_physical_axes=split)
        placements = _placements(cfg)
        engine_sizes = _engine_sizes(cfg, train_mesh)
        engine_mesh = train_mesh if engine_sizes is None else hardware.make_mesh(
            topology, engine_sizes, allow_split_physical_axes=split,
            last=placements == ["disaggregated"])
        if "disaggregated" in placements and train_mesh.size + engine_mesh.size > len(
                topology.devices):
            raise ConfigError(f"placement=disaggregated needs the training mesh's "
                              f"{train_mesh.size} + the engine's {engine_mesh.size} devices, "
                              f"topology {topology.name} has {len(topology.devices)}")
    except (ConfigError, ImportError) as e:
        sys.exit(f"ring_jax.plan: {e}")
    reports = plan.plan(cfg, programs.Meshes(train_mesh, engine_mesh), names,
                        _NUM_LAYERS.value, _DUMP_DIR.value)
    hbm = topology.hbm_per_device
    print(f"topology {topology.name} ({len(topology.devices)} devices, "
          f"{hbm / report.GiB:.0f} GiB HBM each); training mesh {dict(train_mesh.shape)}; "
          f"engine mesh {dict(engine_mesh.shape)}; model {cfg.model.num_layers} layers, "
          f"moe_impl={cfg.model.moe_impl}, engine_moe_impl={cfg.engine_moe_impl}; batch "
          f"{cfg.scheduler.batch_size} x {cfg.scheduler.max_seq_len}; engine "
          f"{cfg.engine.num_slots} slots x {cfg.engine.max_len}")
    engine_layout = layout.engine_layout(engine_mesh, cfg.engine.num_slots, cfg.engine.max_len)
    print(f"engine layout (`rollout.layout`): slots over {engine_layout.slot_axes}, KV-cache "
          f"length over {engine_layout.cache_len_axes}")
    print("per-device GiB: peak = argument + output - alias + temp + code")
    print(report.format_table(reports, hbm, _HEADROOM.value))
    by_name = dict(zip(names, reports))
    if "rl_step" in by_name and set(by_name) & set(placement.ENGINE_PROGRAMS):
        rows = [r for r in placement.placement_rows(by_name, train_mesh.size, engine_mesh.size)
                if r.placement in placements]
        print("\nper-device GiB by engine placement (`ring_jax.plan.placement`)")
        print(placement.format_table(rows, hbm, _HEADROOM.value))


def _placements(cfg) -> list[str]:
    chosen = _PLACEMENT.value or cfg.mesh.engine.placement
    return ["colocated", "disaggregated"] if chosen == "both" else [chosen]


def _engine_sizes(cfg, train_mesh) -> dict[str, int] | None:
    """The engine mesh's sizes: ``--engine_mesh``, else the config's ``mesh.engine`` sizes
    (over its ``num_devices``, or the training mesh's device count); None: the training mesh."""
    from ring_jax.plan import hardware
    if _ENGINE_MESH.value:
        return hardware.parse_mesh(_ENGINE_MESH.value)
    engine = cfg.mesh.engine
    if engine.uses_default_shape:
        return {"data": engine.num_devices} if engine.num_devices else None
    return engine.resolve(engine.num_devices or train_mesh.size)


if __name__ == "__main__":
    app.run(main)

"""Weight sync trainer → engine on device (`ring_jax.rollout.weight_sync`), against a plain
device copy of the same arrays measured side by side in the same run.

    python experiments/benchmarks/weight_sync.py --preset=small --repeats=7

Runs on 8 fake CPU devices (``--xla_force_host_platform_device_count=8``, set here unless
XLA_FLAGS says otherwise): one process, so "devices" share one memory and the numbers say what
the sync programs cost relative to a copy, not how fast ICI or DCN is. The trainer's float32
variables live on a training mesh (fsdp 8); the sync is what `Engine.load_weights` runs,
`weight_sync.WeightSync`: the engine's conversion (cast to the inference dtype) in the
trainer's layout, then a device-to-device move into the engine's layout (experts over
``expert``). The baseline is a jitted copy of the trainer's variables in their own
layout (every byte read and written once). Prints one line per layout with the median
sync / copy ratio (timed alternately, so load drift hits both); the current target is ≤ 2x.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ring_jax import sharding  # noqa: E402
from ring_jax.model import Transformer, presets  # noqa: E402
from ring_jax.rollout import engine as engine_lib  # noqa: E402
from ring_jax.rollout import weight_sync  # noqa: E402
from ring_jax.rollout.precision import InferencePrecision  # noqa: E402
from ring_jax.train import multihost  # noqa: E402
from ring_jax.train.multihost import EngineMeshConfig  # noqa: E402

# name: (training mesh over the first devices, engine placement, inference dtype)
LAYOUTS = {
    "colocated, engine mesh data 2 x expert 4, bf16": (
        dict(fsdp=8), EngineMeshConfig(layout="global", data=2, expert=4), "bfloat16"),
    "colocated, engine mesh data 2 x expert 4, fp32 (reshard only)": (
        dict(fsdp=8), EngineMeshConfig(layout="global", data=2, expert=4), "float32"),
    "colocated, engine on the training mesh, bf16 (cast only)": (
        dict(fsdp=8), EngineMeshConfig(layout="global"), "bfloat16"),
    "disaggregated, trainer fsdp 4 | engine expert 4, bf16": (
        dict(fsdp=4), EngineMeshConfig(layout="global", placement="disaggregated",
                                       num_devices=4, expert=4), "bfloat16"),
}


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def measure(preset: str, train_sizes: dict, engine_cfg: EngineMeshConfig, dtype: str,
            repeats: int) -> tuple[float, float, float, int]:
    """(median sync s, median copy s, median of per-pair ratios, trainer bytes)."""
    cfg = presets.get(preset)
    model = Transformer(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    train_mesh = sharding.make_mesh(**train_sizes)
    with sharding.use_mesh(train_mesh):
        shardings = sharding.param_shardings(train_mesh,
                                             sharding.param_logical_axes(model, tokens))
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), tokens)
    mesh = multihost.engine_mesh(train_mesh, engine_cfg)
    m = engine_lib.model_functions(cfg, engine_lib.EngineConfig(), InferencePrecision(dtype),
                                   mesh=mesh)
    weights_sync = weight_sync.WeightSync(m.prepare_weights, m.weight_sharding)

    def sync(v):  # what Engine.load_weights does to the weights
        with sharding.use_mesh(mesh):
            return weights_sync(v, 1)

    copy = jax.jit(lambda v: jax.tree.map(jnp.copy, v), out_shardings=shardings)
    jax.block_until_ready((sync(variables), copy(variables)))  # compile + warm-up
    syncs, copies = [], []
    for _ in range(repeats):
        syncs.append(_seconds(sync, variables))
        copies.append(_seconds(copy, variables))
    ratios = np.asarray(syncs) / np.asarray(copies)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(variables))
    return float(np.median(syncs)), float(np.median(copies)), float(np.median(ratios)), nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"preset={args.preset}, {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"jax {jax.__version__}")
    for name, (train_sizes, engine_cfg, dtype) in LAYOUTS.items():
        sync_s, copy_s, ratio, nbytes = measure(args.preset, train_sizes, engine_cfg, dtype,
                                                args.repeats)
        print(f"{name}: trainer weights {nbytes / 2**20:.1f} MiB; sync {sync_s * 1e3:.1f} ms, "
              f"copy {copy_s * 1e3:.1f} ms, sync / copy = {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()

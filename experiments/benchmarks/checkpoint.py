"""Checkpoint cost of a train state: how long `save` blocks the loop (async vs sync), the full
write, and the restore, for a model preset's params + AdamW state (no model compile: arrays
of the preset's shapes filled with random values).

    python experiments/benchmarks/checkpoint.py --preset=small --repeats=3

Prints one line per mode and the ratio "sync blocking / async blocking": what the loop saves per
checkpoint by writing in the background.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ring_jax.model import Transformer, presets
from ring_jax.train import checkpoint, optim


def make_state(preset: str) -> dict:
    model = Transformer(presets.get(preset))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    rng = np.random.default_rng(0)
    fill = lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32).astype(s.dtype))
    params = jax.tree.map(fill, shapes["params"])
    tx = optim.make_optimizer(optim.OptimConfig())
    return {"step": jnp.asarray(1), "params": params, "opt_state": tx.init(params),
            "router": jax.tree.map(fill, shapes["router"]), "rng": jax.random.key(0)}


def run(preset: str, repeats: int) -> None:
    state = make_state(preset)
    num_bytes = sum(x.nbytes for x in jax.tree.leaves(checkpoint._keys_to_data(state)))
    print(f"preset={preset} state={num_bytes / 2**20:.1f} MiB "
          f"({len(jax.tree.leaves(state))} arrays), jax {jax.__version__}")
    arrays = {"buffer": [np.arange(n, dtype=np.int32) for n in range(1, 65)]}
    results = {}
    for mode in ("async", "sync"):
        blocking, total, restore = [], [], []
        directory = tempfile.mkdtemp(prefix=f"ckpt_bench_{mode}_")
        cfg = checkpoint.CheckpointConfig(max_to_keep=2, async_save=(mode == "async"))
        with checkpoint.Checkpointer(directory, cfg) as ckpt:
            for step in range(1, repeats + 2):
                t0 = time.perf_counter()
                ckpt.save(step, state=state, meta={"step": step}, arrays=arrays)
                t1 = time.perf_counter()
                ckpt.wait()
                t2 = time.perf_counter()
                if step > 1:   # the first save sets up orbax's threads and directories
                    blocking.append(t1 - t0)
                    total.append(t2 - t0)
            for _ in range(repeats):
                t0 = time.perf_counter()
                restored = ckpt.restore(state)
                jax.block_until_ready(restored.state)
                restore.append(time.perf_counter() - t0)
        shutil.rmtree(directory, ignore_errors=True)
        results[mode] = np.median(blocking)
        print(f"{mode:>5}: save blocks {1e3 * np.median(blocking):8.1f} ms | save to commit "
              f"{1e3 * np.median(total):8.1f} ms | restore {1e3 * np.median(restore):8.1f} ms "
              f"(medians of {repeats})")
    print(f"sync blocking / async blocking = {results['sync'] / results['async']:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run(args.preset, args.repeats)

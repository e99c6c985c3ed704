"""Run by test_engine_pod.py, once under launch/multiprocess_localhost.sh (2 processes x 4 fake
CPU devices) and once as one process with 8 fake devices: the global-mesh rollout engine.

The trainer's variables live on a training mesh (data 2 x fsdp 4) over all 8 devices; the engine
runs over the pod-wide mesh (data 2 x expert 4, `multihost.engine_mesh` with layout="global"),
takes them through the on-device weight sync, generates a fixed request set with a token budget
cut + drain + resume, installs a second policy version mid-flight and finishes. Every process
writes what its engine returned to OUT_DIR/process_<i>.npz.

With NUM_SLOTS (default 8) = 4 the slots split over expert only and the KV cache's length over
data (`rollout.layout`), the axis that spans the two processes: each host holds half of every
slot's keys and values, and the decode attention's softmax sums across hosts.

Usage: python -m engine_pod_prog OUT_DIR [NUM_SLOTS] (with this folder on PYTHONPATH).
"""
import dataclasses
import os
import sys

import numpy as np

from ring_jax.train import distributed

# jax.distributed must start before anything touches a device.
distributed.maybe_initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ring_jax import sharding  # noqa: E402
from ring_jax.model import Transformer, presets  # noqa: E402
from ring_jax.rollout.engine import Engine, EngineConfig  # noqa: E402
from ring_jax.rollout.precision import InferencePrecision  # noqa: E402
from ring_jax.rollout.types import Request, SamplingParams  # noqa: E402
from ring_jax.train import multihost  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

CONFIG = EngineConfig(num_slots=8, max_len=48, decode_chunk=4, record_expert_ids=True,
                      min_prefill_len=48)
ENGINE_MESH = multihost.EngineMeshConfig(layout="global", data=2, expert=4)


def requests() -> list[Request]:
    rng = np.random.default_rng(0)
    return [Request(f"r{i}", rng.integers(0, 512, size=int(rng.integers(1, 20))).astype(
        np.int32), SamplingParams(temperature=0.9, top_p=0.95,
                                  max_new_tokens=int(rng.integers(4, 28))), seed=i)
            for i in range(11)]


def main(out_dir: str, num_slots: int = 8) -> int:
    assert jax.device_count() == 8, jax.devices()
    cfg = dataclasses.replace(presets.get("tiny"), moe_impl="ragged")
    model = Transformer(cfg)
    train_mesh = sharding.make_mesh(data=2, fsdp=4)
    tokens = jnp.zeros((1, 4), jnp.int32)
    with sharding.use_mesh(train_mesh):
        shardings = sharding.param_shardings(train_mesh,
                                             sharding.param_logical_axes(model, tokens))
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), tokens)
        # Policy version 1: every floating weight moved, on device in the trainer's layout.
        variables_v1 = jax.jit(lambda v: jax.tree.map(
            lambda w: w * 1.05 if jnp.issubdtype(w.dtype, jnp.floating) else w, v),
            out_shardings=shardings)(variables)
    engine_mesh = multihost.engine_mesh(train_mesh, ENGINE_MESH)
    engine = Engine.from_model(cfg, multihost.to_engine(variables, ENGINE_MESH),
                               dataclasses.replace(CONFIG, num_slots=num_slots),
                               InferencePrecision("float32"), mesh=engine_mesh)
    w_up = engine.variables["params"]["layers_1"]["moe"]["up"]
    assert w_up.sharding.spec[0] == "expert" and not w_up.is_fully_addressable or \
        jax.process_count() == 1, w_up.sharding
    reqs = requests()
    engine.add(reqs[:5])
    finished = engine.step(token_budget=20).finished  # a cut, then resume the rest
    engine.add(reqs[5:] + engine.drain())
    finished += engine.step(token_budget=40).finished
    engine.load_weights(multihost.to_engine(variables_v1, ENGINE_MESH), version=1)
    finished += engine.step().finished
    out = {}
    for r in finished:
        out[f"{r.request_id}/tokens"] = np.asarray(r.tokens)
        out[f"{r.request_id}/logprobs"] = np.asarray(r.logprobs)
        out[f"{r.request_id}/versions"] = np.asarray(r.versions)
        out[f"{r.request_id}/expert_ids"] = np.asarray(r.expert_ids)
    out["mesh"] = np.asarray([engine_mesh.shape[a] for a in sharding.MESH_AXES])
    out["cache_spec"] = np.asarray(str(engine._state.cache[0]["k"].sharding.spec))
    np.savez(os.path.join(out_dir, f"process_{jax.process_index()}.npz"), **out)
    print(f"process {jax.process_index()} engine pod OK: {len(finished)} requests", flush=True)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1], *map(int, sys.argv[2:]))
    distributed.sync("engine_pod_prog_done")
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    raise SystemExit(code)

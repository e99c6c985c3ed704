"""Ahead-of-time compiles for TPU topologies (XLA's TPU compiler, no TPU): skipped without the
``[tpu-aot]`` extra. The CPU-mesh tests cover numerics; these cover compile + memory."""
import importlib.util
import math
import pathlib

import jax
import pytest

pytest.importorskip("libtpu", reason='needs libtpu: pip install -e ".[tpu-aot]"')

from ring_jax import plan  # noqa: E402
from ring_jax.config import ConfigError  # noqa: E402
from ring_jax.plan import hardware, programs  # noqa: E402
from ring_jax.train import experiment  # noqa: E402

ROOT = pathlib.Path(__file__).parents[2]


def _pod_config(arg: str):
    spec = importlib.util.spec_from_file_location("pod_scale", ROOT / "experiments/pod_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return experiment.from_config_dict(module.get_config(arg))


def _shard_bytes(tree) -> int:
    """Bytes one device holds of these abstract sharded arrays (before TPU tile padding)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def v5p_2x2x1():
    return hardware.get_topology("v5p:2x2x1")


def test_tiny_rl_step_and_decode_compile_and_report_memory(v5p_2x2x1, tmp_path):
    cfg = _pod_config("tiny,batch=8,seq=64,slots=8,cache=64")
    mesh = hardware.make_mesh(v5p_2x2x1, {"fsdp": 2, "expert": 2})
    # The engine on its own (smaller) mesh: the first two chips, slots split over data.
    engine_mesh = hardware.make_mesh(v5p_2x2x1, {"data": 2})
    meshes = programs.Meshes(mesh, engine_mesh)
    # tests/conftest.py sets "highest" matmul precision for CPU parity; the TPU ragged_dot
    # kernel rejects fp32 contraction of bf16 operands, so compile as a TPU run would.
    with jax.default_matmul_precision("default"):
        step, decode = plan.plan(cfg, meshes, ["rl_step", "decode"], dump_dir=str(tmp_path))
    for r, name in ((step, "rl_step"), (decode, "decode")):
        program = programs.PROGRAMS[name](cfg, meshes)
        # XLA holds at least the arguments' shards (TPU pads small arrays to tiles).
        assert r.argument >= _shard_bytes(program.args) > 0, name
        assert r.temp > 0 and r.code > 0 and r.flops > 0 and r.compile_s > 0, name
        assert r.num_layers == 2 and r.fits(v5p_2x2x1.hbm_per_device), name
    assert decode.alias > 0  # the slot state is donated: updated in place
    assert programs.PROGRAMS["decode"](cfg, meshes).mesh is engine_mesh
    # --dump_dir: XLA's account of each compile, with the buffers live at the peak.
    for name in ("rl_step_L2", "decode_L2"):
        assert list((tmp_path / name).glob("*memory-usage-report.txt")), name
        live = (tmp_path / name).glob("*live-range.txt")
        assert any("(peak)" in f.read_text() for f in live), name


def test_optimizer_state_is_sharded_like_the_params(v5p_2x2x1):
    cfg = _pod_config("tiny,batch=8,seq=64")
    mesh = hardware.make_mesh(v5p_2x2x1, {"fsdp": 4})
    from ring_jax.train import optim
    state = programs.train_state(cfg, mesh, optim.make_optimizer(cfg.rl.optim))
    embed = state["params"]["embed"].sharding.spec
    mu_nu = [x for p, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])
             if jax.tree_util.keystr(p).endswith("['embed']")]
    assert len(mu_nu) == 2 and all(x.sharding.spec == embed for x in mu_nu)
    assert embed[1] == ("fsdp", "expert")  # replicated moments: a whole copy per device


def test_mesh_may_split_physical_axes_only_when_asked():
    topology = hardware.get_topology("v5p:4x4x4")
    with pytest.raises(ConfigError, match="allow_split_physical_axes"):
        hardware.make_mesh(topology, {"fsdp": 8, "expert": 8})
    mesh = hardware.make_mesh(topology, {"fsdp": 8, "expert": 8}, allow_split_physical_axes=True)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}


@pytest.mark.slow
def test_shallow_ling_mini_compiles_every_program():
    cfg = _pod_config("ling_mini_2,batch=16,seq=1024,slots=64,cache=1024")
    cfg = plan.with_depth(cfg, 3)  # two MoE layers: the recipe's scan runs a real loop
    topology = hardware.get_topology("v5p:2x2x2")
    mesh = hardware.make_mesh(topology, {"fsdp": 2, "expert": 4})
    with jax.default_matmul_precision("default"):  # as in a TPU run (see above)
        reports = plan.plan(cfg, programs.Meshes(mesh, mesh), list(programs.PROGRAMS))
    assert [r.program for r in reports] == ["rl_step", "logprob", "prefill", "decode"]
    for r in reports:
        assert r.peak > 0 and r.flops > 0 and r.fits(topology.hbm_per_device), r
    # Embedding + head alone: 2 x 157184 x 2048 bf16 split 8 ways.
    assert reports[0].argument > 2 * 157184 * 2048 * 2 / 8

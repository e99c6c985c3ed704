"""ring_jax.rl.registry: typed parameters of registered functions, and a correction that lives in
its own module, selected by "module:function" and validated before anything compiles."""
import os
import subprocess
import sys
import textwrap

import pytest

from ring_jax import config as config_lib
from ring_jax.rl import losses, registry
from ring_jax.train import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A fork's own module: a correction whose τ is required, and an undecorated one.
FORK_MODULE = textwrap.dedent('''
    import jax.numpy as jnp
    from ring_jax.rl import losses

    @losses.register_correction("fork_band", params={"tau": float, "two_sided": True})
    def band(x, cfg):
        log_k_BT = x.log_k_BT if cfg.param("two_sided") else jnp.maximum(x.log_k_BT, 0.0)
        keep_BT = jnp.abs(log_k_BT) <= cfg.param("tau")
        return losses.Correction(keep_BT.astype(jnp.float32), keep_BT)

    def plain(x, cfg):
        return losses.Correction(jnp.ones_like(x.log_k_BT), jnp.ones_like(x.log_k_BT, bool))
''')


@pytest.fixture
def fork_module(tmp_path, monkeypatch):
    """The directory of an importable module ``fork_masks`` (FORK_MODULE)."""
    (tmp_path / "fork_masks.py").write_text(FORK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("param,value,expected", [
    (registry.Param(float), 1, 1.0), (registry.Param(float), 0.5, 0.5),
    (registry.Param(int, min_value=1), 3, 3), (registry.Param(bool), False, False),
    (registry.Param(str, choices=("a", "b")), "b", "b"),
])
def test_param_accepts_and_converts(param, value, expected):
    out = param.check("f", value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("param,value,message", [
    (registry.Param(float), "1", "f='1' is invalid: must be a float"),
    (registry.Param(float), True, "f=True is invalid: must be a float"),
    (registry.Param(int), 1.0, "f=1.0 is invalid: must be an int"),
    (registry.Param(int), True, "f=True is invalid: must be an int"),
    (registry.Param(bool), 1, "f=1 is invalid: must be a bool"),
    (registry.Param(int, min_value=1), 0, "f=0 is invalid: must be >= 1"),
    (registry.Param(float, max_value=2.0), 3.0, "f=3.0 is invalid: must be <= 2.0"),
    (registry.Param(str, choices=("a", "b")), "c", "f='c' is invalid: must be one of"),
])
def test_param_rejects_with_one_line_naming_the_field(param, value, message):
    with pytest.raises(config_lib.ConfigError) as e:
        param.check("f", value)
    assert str(e.value).startswith(message)


def test_bad_declarations_fail_at_registration():
    with pytest.raises(TypeError, match="Param type"):
        registry.Param(list)
    with pytest.raises(config_lib.ConfigError, match="default=-1 is invalid"):
        registry.Param(int, -1, min_value=0)
    with pytest.raises(ValueError, match="reserved"):
        registry.Registry("thing", "thing").register("a:b")(len)


def test_shorthand_declarations():
    r = registry.Registry("thing", "thing")
    r.register("t", params={"req": float, "opt": 3})(len)
    assert r.resolve_params("t", {"req": 1}, "p") == (("opt", 3), ("req", 1.0))
    with pytest.raises(config_lib.ConfigError, match=r"^p.req is missing: thing 't' needs it "
                                                     r"\(float\)$"):
        r.resolve_params("t", (), "p")


def test_a_correction_in_its_own_module(fork_module):
    name = "fork_masks:band"
    with pytest.raises(config_lib.ConfigError,
                       match="^correction_params.tau is missing: correction 'fork_masks:band'"):
        losses.LossConfig(correction=name)
    cfg = losses.LossConfig(correction=name, correction_params={"tau": 0.5})
    assert cfg.correction_params == (("tau", 0.5), ("two_sided", True))
    # The import ran the decorator: the short name is registered too, with the same function.
    assert "fork_band" in losses.available_corrections()
    assert losses.get_correction("fork_band") is losses.get_correction(name)
    assert losses.correction_params(name)["tau"].required
    # An undecorated function is a correction without parameters.
    assert losses.LossConfig(correction="fork_masks:plain").correction_params == ()
    for bad, message in (("fork_masks:nope", "has no attribute 'nope'"),
                         ("no_such_fork_module:f", "No module named 'no_such_fork_module'")):
        with pytest.raises(config_lib.ConfigError, match=f"^correction='{bad}' is invalid: "
                                                         f"cannot import it: .*{message}"):
            losses.LossConfig(correction=bad)


def _validate_only(fork_dir, *overrides):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, str(fork_dir)])}
    return subprocess.run(
        [sys.executable, "-m", "ring_jax.main", "--config=experiments/quickstart.py:smoke",
         f"--workdir={fork_dir / 'run'}", "--validate_only", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_validate_only_catches_a_fork_parameter_typo(fork_module):
    """From the command line (one subprocess: the typo fails in validation with the dotted
    field, and nothing is written to the workdir)."""
    typo = _validate_only(fork_module, "--config.rl.loss.correction=fork_masks:band",
                          "--config.rl.loss.correction_params=(('tua', 0.5),)")
    assert typo.returncode != 0
    assert typo.stderr.strip().splitlines()[-1] == (
        "invalid config: rl.loss.correction_params.tua is not a parameter of correction "
        "'fork_masks:band'; its parameters: ['tau', 'two_sided']")
    assert not (fork_module / "run").exists()


def test_a_study_config_with_a_forked_correction_validates(fork_module, experiment_file):
    c = experiment_file("quickstart").get_config("smoke")
    c.rl.loss.correction = "fork_masks:band"
    c.rl.loss.correction_params = (("tau", 0.5),)  # what the command line above sets
    cfg = experiment.from_config_dict(c)
    assert cfg.rl.loss.correction_params == (("tau", 0.5), ("two_sided", True))
    assert experiment.to_dict(cfg)["rl"]["loss"]["correction_params"] == (
        ("tau", 0.5), ("two_sided", True))  # config.json records the defaults too

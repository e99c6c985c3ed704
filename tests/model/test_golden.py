"""Golden regression of the tiny model's forward (logits slice, expert load, z-loss) on fixed
numpy-seeded weights. It fails when the model's math changes. If the change is intended
(e.g. a fixed bug or a new layer convention), regenerate with
`python tests/model/test_golden.py` and say why in the commit message."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ring_jax.model import Transformer, presets
from tests.model.conftest import random_variables

GOLDEN = pathlib.Path(__file__).parent / "golden" / "tiny_forward.json"


def _forward():
    cfg = presets.get("tiny")
    variables = random_variables(cfg, seed=7, bias_scale=0.1)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 6)),
                         jnp.int32)
    logits, aux = jax.jit(Transformer(cfg).apply)(variables, tokens)
    return {"logits_slice": np.asarray(logits[:, :, :5], np.float64).round(5).tolist(),
            "load": np.asarray(aux["moe/load"]).tolist(),
            "z_loss": round(float(aux["moe/z_loss"]), 5)}


def test_tiny_forward_matches_golden():
    golden, got = json.loads(GOLDEN.read_text()), _forward()
    assert got["load"] == golden["load"], "routing changed (see module docstring)"
    np.testing.assert_allclose(got["logits_slice"], golden["logits_slice"], atol=1e-4,
                               err_msg="tiny logits changed (see module docstring)")
    np.testing.assert_allclose(got["z_loss"], golden["z_loss"], rtol=1e-4)


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    GOLDEN.write_text(json.dumps(_forward()) + "\n")
    print("wrote", GOLDEN)

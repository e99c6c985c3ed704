"""ring_jax.rl.losses: hand-computed cases, a numpy reference, reductions, micro-batching.

The broad tests iterate the correction registry, so a newly registered correction is covered
automatically: the contract tests (finite, row-local, zero gradient where masked, plain GRPO
when the engines agree) need nothing, the numpy reference test asks for an entry in
NP_CORRECTIONS. A toy fork, `abs_log_k_band` below, is registered here with a typed parameter.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax import config as config_lib
from ring_jax.rl import losses, registry
from ring_jax.train import experiment

TOY = "test_abs_log_k_band"


@losses.register_correction(TOY, params={"tau": registry.Param(float, 1.0, min_value=0.0)})
def abs_log_k_band(x: losses.MismatchInputs, cfg: losses.LossConfig) -> losses.Correction:
    """A toy fork: keep a token iff |log k| ≤ τ, kept tokens weighted 1."""
    keep_BT = jnp.abs(x.log_k_BT) <= cfg.param("tau")
    return losses.Correction(keep_BT.astype(jnp.float32), keep_BT)


CORRECTIONS = losses.available_corrections()  # the built-ins, the toy, any other fork


def _loss_and_grad(logp, logp_old, logp_infer, adv, mask, cfg, logp_ref=None, entropy=None):
    """The loss, the metrics and d loss / d logp, run eagerly: op-by-op executables are cached
    across configs, far cheaper on 2 cores than one jit compile per config (jit is covered by
    the micro-batch, vmap and multi-device tests)."""
    def f(lp):
        return losses.policy_loss(lp, logp_old, logp_infer, adv, mask, cfg,
                                  logp_ref_BT=logp_ref, entropy_BT=entropy)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp)
    return loss, metrics, grad


def _loss(*args, **kwargs):
    return _loss_and_grad(*args, **kwargs)[:2]


def _grad(*args, **kwargs):
    return _loss_and_grad(*args, **kwargs)[2]


# ------------------------------------------------------------------------------------------------
# Hand-computed 2×4 case. Probabilities p = π_train(θ_old), q = π_infer, so k = p/q is
#   seq 0: k = [1, 2, 8, pad]      seq 1: k = [1/8, 1, pad, pad]
# logp = logp_old (on-policy, r = 1), advantages [1, -0.5]: the token loss is -c(k)·Â.
# ------------------------------------------------------------------------------------------------
P_OLD = np.array([[0.5, 0.5, 0.8, 0.3], [0.1, 0.9, 0.2, 0.2]])
Q_INFER = np.array([[0.5, 0.25, 0.1, 0.3], [0.8, 0.9, 0.2, 0.2]])
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
ADV = np.array([1.0, -0.5], np.float32)
LOGP_OLD = np.log(P_OLD).astype(np.float32)
LOGP_INFER = np.log(Q_INFER).astype(np.float32)

# (correction, aggregation) -> loss, with the per-token weights c(k) in the comments.
HAND_LOSSES = {
    # none: c = 1. seq sums: -3 (3 tokens), +1 (2 tokens).
    ("none", "seq_mean_token_mean"): (-3 / 3 + 1 / 2) / 2,  # -0.25
    ("none", "token_mean"): (-3 + 1) / 5,  # -0.4
    ("none", "seq_mean_token_sum_norm"): (-3 / 4 + 1 / 4) / 2,  # -0.25 (constant length T=4)
    # icepop [0.5, 5]: c = [1, 2, 0 (k=8 above β)] and [0 (k=1/8 below α), 1]. Masked tokens
    # stay in |y_i| = 3, 2; a bug dropping them would give (-3/2 + 0.5/1)/2 = -0.5.
    ("icepop", "seq_mean_token_mean"): (-3 / 3 + 0.5 / 2) / 2,  # -0.375
    ("icepop", "token_mean"): (-3 + 0.5) / 5,  # -0.5
    ("icepop", "seq_mean_token_sum_norm"): (-3 / 4 + 0.5 / 4) / 2,  # -0.3125
    # tis C=2: c = [1, 2, 2] and [1/8, 1]. seq sums -5 and 0.5·(1/8 + 1) = 0.5625.
    ("tis", "seq_mean_token_mean"): (-5 / 3 + 0.5625 / 2) / 2,  # -0.6927083
    ("tis", "token_mean"): (-5 + 0.5625) / 5,  # -0.8875
    ("tis", "seq_mean_token_sum_norm"): (-5 / 4 + 0.5625 / 4) / 2,  # -0.5546875
    # seq_mask [0.5, 5] on the geometric mean: seq 0 (1·2·8)^(1/3) = 2.52 kept with c = 1;
    # seq 1 (1/8·1)^(1/2) = 0.354 dropped whole (but still counts as a sequence).
    ("seq_mask", "seq_mean_token_mean"): (-3 / 3 + 0) / 2,  # -0.5
    ("seq_mask", "token_mean"): -3 / 5,  # -0.6
    ("seq_mask", "seq_mean_token_sum_norm"): (-3 / 4) / 2,  # -0.375
    # kpop φ=0.14: binary KLs (fwd, bwd): k=2 token (p=.5, q=.25): (0.1438, 0.1308) -> masked
    # because the forward direction exceeds φ (a one-direction bug keeps it); k=8 token
    # (p=.8, q=.1): 1.36 -> masked; k=1/8 token: 1.35 -> masked; p = q tokens: 0 -> kept, c = 1.
    ("kpop", "seq_mean_token_mean"): (-1 / 3 + 0.5 / 2) / 2,  # -0.0416667
    ("kpop", "token_mean"): (-1 + 0.5) / 5,  # -0.1
    ("kpop", "seq_mean_token_sum_norm"): (-1 / 4 + 0.5 / 4) / 2,  # -0.0625
}


@pytest.mark.parametrize("correction,aggregation", sorted(HAND_LOSSES))
def test_hand_computed_losses(correction, aggregation):
    cfg = losses.LossConfig(correction=correction, aggregation=aggregation, kpop_phi=0.14)
    loss, _ = _loss(LOGP_OLD, LOGP_OLD, LOGP_INFER, ADV, MASK, cfg)
    np.testing.assert_allclose(float(loss), HAND_LOSSES[(correction, aggregation)], rtol=1e-6)


# masked_in_denominator=False: only kept tokens count in |y_i| / the token count, and a sequence
# with no kept token leaves the average. Same batch and weights as HAND_LOSSES.
HAND_LOSSES_MASKED_REMOVED = {
    # icepop keeps [1, 2] of seq 0 and [1] of seq 1: |y| = 2, 1; 3 kept tokens.
    ("icepop", "seq_mean_token_mean"): (-3 / 2 + 0.5 / 1) / 2,  # -0.5
    ("icepop", "token_mean"): (-3 + 0.5) / 3,  # -0.8333
    # kpop φ=0.14 keeps only the p = q tokens: one per sequence.
    ("kpop", "seq_mean_token_mean"): (-1 / 1 + 0.5 / 1) / 2,  # -0.25
    ("kpop", "token_mean"): (-1 + 0.5) / 2,  # -0.25
    # seq_mask drops seq 1 whole, so it leaves the 1/G average: G = 1.
    ("seq_mask", "seq_mean_token_mean"): (-3 / 3) / 1,  # -1.0
    ("seq_mask", "token_mean"): -3 / 3,  # -1.0
    # none and tis mask nothing: the same as with masked tokens kept in.
    ("tis", "seq_mean_token_mean"): HAND_LOSSES[("tis", "seq_mean_token_mean")],
    ("none", "token_mean"): HAND_LOSSES[("none", "token_mean")],
}


@pytest.mark.parametrize("correction,aggregation", sorted(HAND_LOSSES_MASKED_REMOVED))
def test_hand_computed_losses_masked_removed_from_denominator(correction, aggregation):
    cfg = losses.LossConfig(correction=correction, aggregation=aggregation, kpop_phi=0.14,
                            masked_in_denominator=False)
    loss, _ = _loss(LOGP_OLD, LOGP_OLD, LOGP_INFER, ADV, MASK, cfg)
    np.testing.assert_allclose(float(loss), HAND_LOSSES_MASKED_REMOVED[(correction, aggregation)],
                               rtol=1e-6)
    keep = losses.kept_tokens(LOGP_OLD, LOGP_INFER, MASK, cfg)
    terms = losses.policy_loss_terms(LOGP_OLD, LOGP_OLD, LOGP_INFER, ADV, MASK, cfg)
    assert float(losses.loss_denominator(MASK, cfg, keep)) == float(terms.denominator)


def test_hand_computed_mismatch_metrics():
    _, m = _loss(LOGP_OLD, LOGP_OLD, LOGP_INFER, ADV, MASK,
                 losses.LossConfig(correction="icepop"))
    ln2, ln8 = math.log(2), math.log(8)
    expected = {
        "mismatch/masked_frac": 2 / 5,  # k=8 and k=1/8
        "mismatch/masked_frac_above": 1 / 5,
        "mismatch/masked_frac_below": 1 / 5,
        "mismatch/abs_logp_diff_mean": (ln2 + 2 * ln8) / 5,
        "mismatch/abs_logp_diff_max": ln8,
        # k3 = k - 1 - log k per token: 0, 2-1-ln2, 8-1-ln8, 1/8-1+ln8, 0.
        "mismatch/k3_kl": ((1 - ln2) + (7 - ln8) + (ln8 - 7 / 8)) / 5,
        "mismatch/k_mean": (1 + 2 + 8 + 1 / 8 + 1) / 5,
        # weights [1, 2, 0, 0, 1]: (Σw)²/(N Σw²) = 16 / (5·6).
        "mismatch/ess": 16 / 30,
        "mismatch/weight_mean": 4 / 5,
        # bucket width 1 (T=4, 4 buckets): position 0 holds |ln1| and |ln 1/8|.
        "mismatch/abs_logp_diff_mean/pos_0_0": ln8 / 2,
        "mismatch/abs_logp_diff_mean/pos_1_1": ln2 / 2,
        "mismatch/abs_logp_diff_max/pos_2_2": ln8,
        "mismatch/abs_logp_diff_mean/pos_3_end": 0.0,  # no response token there
        "rl/ratio_mean": 1.0,
        "rl/clip_frac": 0.0,
        "rl/response_tokens": 5.0,
    }
    for key, value in expected.items():
        np.testing.assert_allclose(float(m[key]), value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_hand_computed_clipping_and_gradient():
    # All 8 tokens are response tokens; correction none; seq 0 has Â=+1, seq 1 has Â=-1.
    ratio = np.array([[1.5, 1.1, 0.5, 1.0], [1.5, 0.5, 0.9, 1.0]])
    logp_old = np.full((2, 4), -1.0, np.float32)
    logp = (logp_old + np.log(ratio)).astype(np.float32)
    adv, mask = np.array([1.0, -1.0], np.float32), np.ones((2, 4), np.float32)
    cfg = losses.LossConfig(correction="none", aggregation="token_mean", eps_low=0.2,
                            eps_high=0.28)
    loss, m = _loss(logp, logp_old, logp_old, adv, mask, cfg)
    # Â>0 tokens: min(r, clip(r)) = [1.28, 1.1, 0.5, 1.0]; Â<0: min(-r, -clip(r)) =
    # [-1.5, -0.8, -0.9, -1.0]. Loss = -(3.88 - 4.2)/8. A max instead of min would give -0.0875.
    np.testing.assert_allclose(float(loss), (-3.88 + 4.2) / 8, rtol=1e-6)
    # Clipped (zero-gradient) tokens: r=1.5 with Â>0 and r=0.5 with Â<0.
    np.testing.assert_allclose(float(m["rl/clip_frac"]), 2 / 8, rtol=1e-6)
    np.testing.assert_allclose(float(m["rl/ratio_mean"]), ratio.mean(), rtol=1e-6)
    # d/dlogp of -r·Â/8 is -r·Â/8 on unclipped tokens, 0 on clipped ones.
    expected_grad = np.array([[0, -1.1, -0.5, -1.0], [1.5, 0, 0.9, 1.0]]) / 8
    np.testing.assert_allclose(np.asarray(_grad(logp, logp_old, logp_old, adv, mask, cfg)),
                               expected_grad, rtol=1e-6, atol=1e-8)
    # No clipping: plain r·Â, so -(4.1 - 3.9)/8.
    loss_noclip, _ = _loss(logp, logp_old, logp_old, adv, mask,
                           dataclasses.replace(cfg, clip=False))
    np.testing.assert_allclose(float(loss_noclip), -(4.1 - 3.9) / 8, rtol=1e-5)


def test_hand_computed_kl_and_entropy_terms():
    logp = np.log(np.array([[0.5, 0.25, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])).astype(np.float32)
    logp_ref = np.log(np.full((2, 4), 0.5)).astype(np.float32)
    entropy = np.array([[1.0, 2.0, 3.0, 9.0], [4.0, 0.0, 9.0, 9.0]], np.float32)
    mask, adv = MASK, np.zeros(2, np.float32)  # Â = 0 isolates the penalty terms
    # One token differs: log ρ = log π_ref - log π = ln 2. k1 = -ln2, k2 = ln²2/2, k3 = 2-1-ln2.
    ln2 = math.log(2)
    for estimator, per_token in (("k1", -ln2), ("k2", ln2 ** 2 / 2), ("k3", 1 - ln2)):
        cfg = losses.LossConfig(correction="none", aggregation="token_mean", kl_coef=0.1,
                                kl_estimator=estimator)
        loss, m = _loss(logp, logp, logp, adv, mask, cfg, logp_ref=logp_ref)
        np.testing.assert_allclose(float(loss), 0.1 * per_token / 5, rtol=1e-5)
        np.testing.assert_allclose(float(m["rl/kl_ref"]), per_token / 5, rtol=1e-5)
    # Entropy bonus: -0.01 · mean entropy of the 5 response tokens (1+2+3+4+0)/5 = 2.
    cfg = losses.LossConfig(correction="none", aggregation="token_mean", entropy_coef=0.01)
    loss, m = _loss(logp, logp, logp, adv, mask, cfg, entropy=entropy)
    np.testing.assert_allclose(float(loss), -0.01 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(m["rl/entropy_all_tokens"]), 2.0, rtol=1e-6)


def test_masked_token_entropy_metric():
    entropy = np.array([[1.0, 2.0, 3.0, 9.0], [4.0, 0.0, 9.0, 9.0]], np.float32)
    _, m = _loss(LOGP_OLD, LOGP_OLD, LOGP_INFER, ADV, MASK, losses.LossConfig(),
                 entropy=entropy)
    # icepop masks the k=8 token (entropy 3) and the k=1/8 token (entropy 4).
    np.testing.assert_allclose(float(m["rl/entropy_masked_tokens"]), 3.5, rtol=1e-6)
    np.testing.assert_allclose(float(m["rl/entropy_all_tokens"]), 2.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# numpy reference (float64), written independently of the JAX code
# ------------------------------------------------------------------------------------------------


def _np_binary_kl(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        head = p * (np.log(p) - np.log(q))
        tail = np.where(p >= 1, 0.0, (1 - p) * (np.log1p(-p) - np.log1p(-q)))
    return head + tail


def _np_band(x, cfg):
    lo = -np.inf if cfg.alpha == 0 else np.log(cfg.alpha)
    return (x >= lo) & (x <= np.log(cfg.beta))


def _np_kpop(log_k, logp_old, logp_infer, mask, cfg):
    p, q = np.exp(logp_old), np.exp(logp_infer)
    keep = (_np_binary_kl(p, q) <= cfg.kpop_phi) & (_np_binary_kl(q, p) <= cfg.kpop_phi)
    return np.where(keep, np.exp(log_k), 0.0)


def _np_seq_mask(log_k, logp_old, logp_infer, mask, cfg):
    geo_mean_log_k = (log_k * mask).sum(1) / np.maximum(mask.sum(1), 1)
    return np.broadcast_to(_np_band(geo_mean_log_k, cfg)[:, None], mask.shape).astype(float)


# Correction name -> c(k) per token, float64: fn(log_k, logp_old, logp_infer, mask, cfg).
NP_CORRECTIONS = {
    "none": lambda log_k, *_, cfg: np.ones_like(log_k),
    "tis": lambda log_k, *_, cfg: np.minimum(np.exp(log_k), cfg.tis_cap),
    "icepop": lambda log_k, *_, cfg: np.where(_np_band(log_k, cfg), np.exp(log_k), 0.0),
    "kpop": _np_kpop,
    "seq_mask": _np_seq_mask,
    TOY: lambda log_k, *_, cfg: (np.abs(log_k) <= cfg.param("tau")).astype(float),
}


def np_policy_loss(logp, logp_old, logp_infer, adv, mask, cfg):
    logp, logp_old, logp_infer = (np.asarray(x, np.float64) for x in (logp, logp_old, logp_infer))
    on = mask > 0
    adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, mask.shape)
    log_k = np.where(on, logp_old - logp_infer, 0.0)
    w = NP_CORRECTIONS[cfg.correction](log_k, logp_old, logp_infer, mask, cfg=cfg)
    w = np.where(on, w, 0.0)
    r = np.exp(np.where(on & (w > 0), logp - logp_old, 0.0))
    if cfg.clip:
        pg = np.minimum(r * adv, np.clip(r, 1 - cfg.eps_low, 1 + cfg.eps_high) * adv)
    else:
        pg = r * adv
    tok = np.where(on, -w * pg, 0.0)
    n = mask.sum(1) if cfg.masked_in_denominator else (on & (w > 0)).sum(1)
    if cfg.aggregation == "token_mean" and not cfg.masked_in_denominator:
        return tok.sum() / n.sum()
    if cfg.aggregation == "seq_mean_token_mean":
        return (tok.sum(1)[n > 0] / n[n > 0]).sum() / (n > 0).sum()
    if cfg.aggregation == "token_mean":
        return tok.sum() / mask.sum()
    return (tok.sum(1) / mask.shape[1]).sum() / (n > 0).sum()


def _random_batch(seed, rows=6, cols=10, extreme=False):
    rng = np.random.default_rng(seed)
    logp_infer = -rng.exponential(1.0, (rows, cols))
    log_k = rng.normal(0, 0.5, (rows, cols))
    log_r = rng.normal(0, 0.3, (rows, cols))
    if extreme:  # ±50 log-ratios on a quarter of the tokens
        pick = rng.random((rows, cols)) < 0.25
        log_k = np.where(pick, rng.choice([-50.0, 50.0], (rows, cols)), log_k)
        pick = rng.random((rows, cols)) < 0.25
        log_r = np.where(pick, rng.choice([-50.0, 50.0], (rows, cols)), log_r)
    logp_old = np.minimum(logp_infer + log_k, 0.0)
    logp = logp_old + log_r
    lengths = rng.integers(1, cols + 1, rows)
    lengths[0] = 0  # an all-padding row
    start = rng.integers(0, 3, rows)
    t = np.arange(cols)
    mask = ((t >= start[:, None]) & (t < (start + lengths)[:, None])).astype(np.float32)
    adv = rng.normal(0, 1, rows)
    f = lambda x: np.asarray(x, np.float32)
    return f(logp), f(logp_old), f(logp_infer), f(adv), mask


def _check_against_reference(correction, aggregation, clip, extreme, masked_in_denominator=True):
    cfg = losses.LossConfig(correction=correction, aggregation=aggregation, clip=clip,
                            eps_high=0.28, kpop_phi=0.3,
                            masked_in_denominator=masked_in_denominator)
    for seed in range(3):
        batch = _random_batch(seed + 10 * extreme, extreme=extreme)
        loss, metrics, grad = _loss_and_grad(*batch, cfg)
        assert np.isfinite(float(loss))
        assert np.isfinite(np.asarray(grad)).all()
        for key, value in metrics.items():
            assert np.isfinite(np.asarray(value)).all(), key
        # exp(±50) of a float32 log-ratio carries ~50·6e-8 relative rounding.
        np.testing.assert_allclose(float(loss), np_policy_loss(*batch, cfg),
                                   rtol=1e-4 if extreme else 2e-5, atol=1e-6,
                                   err_msg=f"{correction} {aggregation} clip={clip}")


# Default set: every correction with every aggregation once, clipping on and off.
REFERENCE_CASES = [(c, a, a != "token_mean") for c in CORRECTIONS for a in losses.AGGREGATIONS]


@pytest.mark.parametrize("correction,aggregation,clip", REFERENCE_CASES)
def test_matches_numpy_reference(correction, aggregation, clip):
    if correction not in NP_CORRECTIONS:
        pytest.fail(f"correction {correction!r} is registered but has no numpy reference: add "
                    "its c(k) to NP_CORRECTIONS")
    for extreme in (False, True):
        _check_against_reference(correction, aggregation, clip, extreme)


@pytest.mark.parametrize("correction", ["icepop", "kpop", "seq_mask"])
@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_masked_removed_from_denominator_matches_numpy_reference(correction, aggregation):
    _check_against_reference(correction, aggregation, True, extreme=True,
                             masked_in_denominator=False)


@pytest.mark.slow
@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_matches_numpy_reference_full_sweep(correction, aggregation):
    for extreme in (False, True):
        _check_against_reference(correction, aggregation, aggregation == "token_mean", extreme)


# ------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_icepop_with_open_band_is_none_weighted_by_k(aggregation):
    logp, logp_old, logp_infer, adv, mask = _random_batch(1)
    open_band = losses.LossConfig(correction="icepop", alpha=0.0, beta=math.inf,
                                  aggregation=aggregation)
    none = losses.LossConfig(correction="none", aggregation=aggregation)
    k = np.exp(np.where(mask > 0, logp_old - logp_infer, 0.0)).astype(np.float32)
    adv_times_k = adv[:, None] * k  # k > 0 commutes with the clipped min
    loss_ice, _ = _loss(logp, logp_old, logp_infer, adv, mask, open_band)
    loss_none, _ = _loss(logp, logp_old, logp_infer, adv_times_k, mask, none)
    np.testing.assert_allclose(float(loss_ice), float(loss_none), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(_grad(logp, logp_old, logp_infer, adv, mask, open_band)),
                               np.asarray(_grad(logp, logp_old, logp_infer, adv_times_k, mask,
                                                none)), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_all_corrections_equal_none_when_engines_agree(correction):
    logp, logp_old, _, adv, mask = _random_batch(2)
    loss, _, grad = _loss_and_grad(logp, logp_old, logp_old, adv, mask,
                                   losses.LossConfig(correction=correction))
    loss_none, _, grad_none = _loss_and_grad(logp, logp_old, logp_old, adv, mask,
                                             losses.LossConfig(correction="none"))
    np.testing.assert_allclose(float(loss), float(loss_none), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad_none))


def _verdict(correction, logp_old, logp_infer, mask, cfg):
    """(weight, keep) of a correction on a batch, numpy."""
    inputs = losses.MismatchInputs(
        jnp.where(mask > 0, logp_old - logp_infer, 0.0), jnp.asarray(logp_old),
        jnp.asarray(logp_infer), jnp.asarray(mask))
    out = losses.get_correction(correction)(inputs, cfg)
    return np.asarray(out.weight_BT), np.asarray(out.keep_BT)


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_correction_contract(correction):
    """What the loss relies on, for every registered correction: finite on extreme log-ratios
    (±50), weight ≥ 0 and 0 where not kept, row-local (each row's verdict depends on that row
    only, so micro-batches are exact), and masked and padding tokens get exactly zero
    gradient even where log π is garbage."""
    logp, logp_old, logp_infer, adv, mask = _random_batch(3, extreme=True)
    cfg = losses.LossConfig(correction=correction, kpop_phi=0.3, clip=False)
    weight, keep = _verdict(correction, logp_old, logp_infer, mask, cfg)
    on = mask > 0
    assert np.isfinite(weight).all() and (weight[on] >= 0).all()
    assert (weight[on & ~keep] == 0).all()
    top, bottom = _verdict(correction, logp_old[:3], logp_infer[:3], mask[:3], cfg), _verdict(
        correction, logp_old[3:], logp_infer[3:], mask[3:], cfg)
    np.testing.assert_array_equal(np.concatenate([top[0], bottom[0]])[on], weight[on])
    np.testing.assert_array_equal(np.concatenate([top[1], bottom[1]])[on], keep[on])

    # Nonzero gradient expected where it cannot underflow in float32 (TIS weights e^-50 times
    # a ratio e^-50 can).
    moderate = (weight > 1e-6) & (np.abs(logp - logp_old) < 10) & (adv[:, None] != 0)
    logp = np.where(on, logp, np.nan).astype(np.float32)  # garbage outside the response
    grad = np.asarray(_grad(logp, logp_old, logp_infer, adv, mask, cfg))
    trained = on & keep & (weight > 0)
    assert np.all(grad[~trained] == 0.0)
    assert np.all(grad[trained & moderate] != 0.0)


@pytest.mark.parametrize("correction", ["icepop", "kpop", "seq_mask", TOY])
def test_masking_corrections_mask_the_extreme_batch(correction):
    # So that test_correction_contract's zero-gradient check meets masked tokens.
    _, logp_old, logp_infer, _, mask = _random_batch(3, extreme=True)
    cfg = losses.LossConfig(correction=correction, kpop_phi=0.3)
    _, keep = _verdict(correction, logp_old, logp_infer, mask, cfg)
    assert (~keep & (mask > 0)).any()


def _split_rows(arrays, pieces):
    return [[a[i::pieces] for a in arrays] for i in range(pieces)]


@pytest.mark.parametrize("aggregation,masked_in_denominator", [
    *[(a, True) for a in losses.AGGREGATIONS],
    ("seq_mean_token_mean", False), ("token_mean", False)])
def test_micro_batches_equal_full_batch(aggregation, masked_in_denominator):
    batch = _random_batch(4, rows=8, cols=12, extreme=True)
    entropy = np.random.default_rng(0).random(batch[-1].shape).astype(np.float32)
    cfg = losses.LossConfig(correction="icepop", aggregation=aggregation, eps_high=0.28,
                            masked_in_denominator=masked_in_denominator)

    @jax.jit
    def piece_terms(logp, logp_old, logp_infer, adv, mask, ent, norm):
        def f(lp):
            terms = losses.policy_loss_terms(lp, logp_old, logp_infer, adv, mask, cfg,
                                             entropy_BT=ent)
            return terms.loss_sum / norm, terms
        return jax.value_and_grad(f, has_aux=True)(logp)

    full_loss, full_metrics = _loss(*batch, cfg, entropy=entropy)
    full_grad = _grad(*batch, cfg)
    _, logp_old, logp_infer, _, mask = batch
    norm = losses.loss_denominator(mask, cfg, losses.kept_tokens(logp_old, logp_infer, mask, cfg))
    total, grads, loss = None, [], 0.0
    for piece in _split_rows(list(batch) + [entropy], 4):
        (piece_loss, terms), g = piece_terms(*piece, norm)
        loss += piece_loss
        grads.append(g)
        total = terms if total is None else losses.accumulate_terms(total, terms)
    np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-5)
    grad = np.empty_like(np.asarray(full_grad))
    for i, g in enumerate(grads):
        grad[i::4] = np.asarray(g)
    np.testing.assert_allclose(grad, np.asarray(full_grad), rtol=1e-5, atol=1e-9)
    acc_loss, acc_metrics = losses.finalize(total)
    np.testing.assert_allclose(float(acc_loss), float(full_loss), rtol=1e-5)
    assert acc_metrics.keys() == full_metrics.keys()
    for key in full_metrics:
        np.testing.assert_allclose(float(acc_metrics[key]), float(full_metrics[key]),
                                   rtol=1e-5, atol=1e-7, err_msg=key)


def test_vmap_over_batches_equals_loop():
    batches = [_random_batch(s) for s in range(3)]
    stacked = [np.stack(x) for x in zip(*batches)]
    cfg = losses.LossConfig(correction="icepop")
    vmapped, metrics = jax.jit(jax.vmap(lambda *a: losses.policy_loss(*a, cfg)))(*stacked)
    for i, batch in enumerate(batches):
        loss, m = _loss(*batch, cfg)
        np.testing.assert_allclose(float(vmapped[i]), float(loss), rtol=1e-6)
        np.testing.assert_allclose(float(metrics["mismatch/masked_frac"][i]),
                                   float(m["mismatch/masked_frac"]), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Config and registry
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(correction="icepopp"), "correction"),
    (dict(alpha=1.5), "alpha"),
    (dict(beta=0.9), "beta"),
    (dict(aggregation="mean"), "aggregation"),
    (dict(eps_low=1.0), "eps_low"),
    (dict(tis_cap=0.0), "tis_cap"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(max_response_len=0), "max_response_len"),
    (dict(clip=1), "clip"),
    (dict(masked_in_denominator=0), "masked_in_denominator"),
    (dict(masked_in_denominator=False, aggregation="seq_mean_token_sum_norm"),
     "masked_in_denominator"),
    (dict(correction_params=(("tau", "x"),)), "correction_params"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(config_lib.ConfigError, match=field):
        losses.LossConfig(**kwargs)


def test_config_is_hashable_static_arg():
    assert hash(losses.LossConfig()) == hash(losses.LossConfig())


@pytest.mark.parametrize("tau,expected", [
    # |log k| = [0, ln 2, ln 8] and [ln 8, 0] (HAND_LOSSES' batch), Â = [1, -0.5], c = 1 on kept
    # tokens, masked ones stay in |y_i| = 3, 2.
    (1.0, (-2 / 3 + 0.5 / 2) / 2),  # keeps k = 1, 2 and 1
    (0.5, (-1 / 3 + 0.5 / 2) / 2),  # keeps k = 1 and 1
    (3, (-3 / 3 + 1 / 2) / 2),  # an int is a valid float: keeps all, as "none"
])
def test_toy_fork_with_a_typed_parameter(tau, expected):
    cfg = losses.LossConfig(correction=TOY, correction_params={"tau": tau})
    assert cfg.param("tau") == float(tau) and isinstance(cfg.param("tau"), float)
    loss, m = _loss(LOGP_OLD, LOGP_OLD, LOGP_INFER, ADV, MASK, cfg)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    # The declared default fills in, and the config (a jit static argument) stays hashable.
    assert losses.LossConfig(correction=TOY).correction_params == (("tau", 1.0),)
    assert hash(losses.LossConfig(correction=TOY, correction_params=(("tau", 1),))) == hash(
        losses.LossConfig(correction=TOY))
    # Selected by "module:function" too (this module is imported): the same registration.
    by_path = losses.LossConfig(correction=f"{__name__}:abs_log_k_band",
                                correction_params={"tau": tau})
    assert by_path.param("tau") == float(tau)
    np.testing.assert_allclose(float(_loss(LOGP_OLD, LOGP_OLD, LOGP_INFER, ADV, MASK,
                                           by_path)[0]), expected, rtol=1e-6)


@pytest.mark.parametrize("params,message", [
    ({"tau": "x"}, "rl.loss.correction_params.tau='x' is invalid: must be a float"),
    ({"tau": True}, "rl.loss.correction_params.tau=True is invalid: must be a float"),
    ({"tau": -1.0}, "rl.loss.correction_params.tau=-1.0 is invalid: must be >= 0.0"),
    ({"tua": 0.5}, "rl.loss.correction_params.tua is not a parameter of correction "
                   f"'{TOY}'; its parameters: ['tau']"),
])
def test_toy_fork_parameters_are_validated_when_the_config_is_built(params, message):
    values = {"rl": {"loss": {"correction": TOY, "correction_params": params}}}
    with pytest.raises(config_lib.ConfigError) as e:
        experiment.build(experiment.ExperimentConfig, values)
    assert str(e.value) == message


def test_registry_errors():
    with pytest.raises(ValueError, match="already registered"):
        losses.register_correction(TOY)(lambda x, c: None)
    with pytest.raises(config_lib.ConfigError, match="correction_params.tau is not a parameter "
                       "of correction 'icepop'; its parameters: none"):
        losses.LossConfig(correction="icepop", correction_params={"tau": 1.0})
    with pytest.raises(config_lib.ConfigError, match="reads parameter 'tua' without declaring"):
        losses.LossConfig(correction=TOY).param("tua")


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=6.0, beta=5.0), "alpha=6.0 is invalid: must be < beta=5.0: [α, β] is the band"),
    (dict(alpha=1.0, beta=1.0), "alpha=1.0 is invalid: must be < beta=1.0"),
    (dict(alpha=2.0, beta=5.0), "alpha=2.0 is invalid: must be <= 1: the band [α, β] must "
                                "contain k = 1"),
    (dict(alpha=0.2, beta=0.5), "beta=0.5 is invalid: must be >= 1: the band [α, β] must "
                                "contain k = 1"),
])
def test_icepop_band_edges_are_rejected_with_the_reason(kwargs, message):
    with pytest.raises(config_lib.ConfigError) as e:
        losses.LossConfig(**kwargs)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("alpha,beta", [(1.0, 5.0), (0.5, 1.0), (0.0, math.inf)])
def test_one_sided_and_open_bands_are_allowed(alpha, beta):
    cfg = losses.LossConfig(correction="icepop", alpha=alpha, beta=beta)
    _, m = _loss(LOGP_OLD, LOGP_OLD, LOGP_INFER, ADV, MASK, cfg)
    # k = [1, 2, 8] and [1/8, 1]: [1, 5] masks 8 and 1/8; [0.5, 1] masks 2, 8 and 1/8.
    expected = {(1.0, 5.0): 2 / 5, (0.5, 1.0): 3 / 5, (0.0, math.inf): 0.0}[(alpha, beta)]
    np.testing.assert_allclose(float(m["mismatch/masked_frac"]), expected, rtol=1e-6)


def test_missing_optional_inputs_raise():
    with pytest.raises(ValueError, match="keep_BT"):
        losses.loss_denominator(MASK, losses.LossConfig(masked_in_denominator=False))
    with pytest.raises(ValueError, match="logp_ref"):
        _loss(LOGP_OLD, LOGP_OLD, LOGP_INFER, ADV, MASK, losses.LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        _loss(LOGP_OLD, LOGP_OLD, LOGP_INFER, ADV, MASK, losses.LossConfig(entropy_coef=0.1))


def test_binary_kl_edges():
    logp = jnp.log(jnp.array([1.0, 0.5, 1e-30, 0.9]))
    logq = jnp.log(jnp.array([1.0, 0.5, 0.5, 1.0]))
    kl = np.asarray(losses.binary_kl(logp, logq))
    assert kl[0] == 0.0 and kl[1] == 0.0
    np.testing.assert_allclose(kl[2], math.log(2), rtol=1e-5)  # ≈ (1) log(1/0.5)
    assert np.isposinf(kl[3])  # q = 1 > p: the rest of the vocabulary is impossible under q

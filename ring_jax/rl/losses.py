"""The GRPO-family policy loss with training-inference mismatch corrections (PAPER §1).

The objective (Ring-1T eq. for IcePop; PAPER §1 "Objective"), per response token t of sequence i:

    J = 1/G Σ_i 1/|y_i| Σ_t c(k_it) · min(r_it Â_it, clip(r_it, 1-ε_low, 1+ε_high) Â_it)

    r = π_train(θ) / π_train(θ_old)        the PPO ratio (has the gradient);
    k = π_train(θ_old) / π_infer(θ_old)    the engine-vs-engine ratio (a constant);
    c(k)                                   the *correction*: 1 (none), min(k, C) (TIS),
                                           M(k; α, β) (IcePop), ... — chosen by name.

`policy_loss` returns the scalar to minimise, -J, and metrics. Masked tokens (c = 0) get exactly
zero gradient yet still count in |y_i| (PAPER §1: dropping them from the denominator would
inflate the remaining tokens' gradients). ``masked_in_denominator=False`` drops them, the
ablation PAPER §1 argues against (issue 7's study 3 measures it).

Micro-batching (gradient accumulation) is exact because every reduction is a sum/denominator
pair (`LossTerms`). The denominator of the whole minibatch, `loss_denominator(mask_BT, cfg)` of
the full minibatch's mask, is fixed before the pieces are processed:

    norm = loss_denominator(mask_full_BT, cfg)           # sequences, or tokens for token_mean
    #   (masked_in_denominator=False: loss_denominator(mask, cfg, kept_tokens(...)) instead)
    total = None
    for piece in pieces:                                  # rows of the minibatch
        def f(params):
            terms = policy_loss_terms(logp(params, piece), ..., cfg)
            return terms.loss_sum / norm, terms
        (_, terms), grads_piece = jax.value_and_grad(f, has_aux=True)(params)
        grads += grads_piece
        total = terms if total is None else accumulate_terms(total, terms)
    loss, metrics = finalize(total)                       # == policy_loss on the full minibatch

The sum of the pieces' gradients equals the full minibatch's gradient, and `finalize` of the
accumulated terms gives the full minibatch's loss and metrics (means, fractions, maxima, ESS).

A new correction is one function registered by name with the hyper-parameters it reads,
typed (STYLE.md "Forking"; `ring_jax.rl.registry`); `LossConfig` checks them when it is built:

    @losses.register_correction("my_mask", params={"tau": registry.Param(float, 0.3)})
    def my_mask(x: losses.MismatchInputs, cfg: losses.LossConfig) -> losses.Correction:
        keep_BT = jnp.abs(x.log_k_BT) <= cfg.param("tau")
        ...

    cfg = losses.LossConfig(correction="my_mask", correction_params={"tau": 0.5})
    cfg = losses.LossConfig(correction="my_pkg.masks:my_mask")  # imports my_pkg.masks
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from ring_jax import config as config_lib
from ring_jax.rl import registry

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


# ------------------------------------------------------------------------------------------------
# Corrections: registry
# ------------------------------------------------------------------------------------------------


class MismatchInputs(NamedTuple):
    """What a correction sees: float32 [B, T] constants (no gradient flows through them).

    Entries outside the response (``mask_BT == 0``) have ``log_k_BT == 0`` so a correction never
    meets padding garbage; its output there is ignored.
    """

    log_k_BT: jax.Array  # log k = logp_old - logp_infer
    logp_old_BT: jax.Array  # log π_train(θ_old)
    logp_infer_BT: jax.Array  # log π_infer(θ_old), as recorded by the sampler
    mask_BT: jax.Array  # 1.0 on response tokens


class Correction(NamedTuple):
    """A correction's verdict per token: ``weight_BT`` multiplies the token's clipped
    policy-gradient term (0 = masked); ``keep_BT`` (bool) says whether the token was kept, for
    the masked-fraction and masked-token-entropy metrics."""

    weight_BT: jax.Array
    keep_BT: jax.Array


CorrectionFn = Callable[[MismatchInputs, "LossConfig"], Correction]
_CORRECTIONS = registry.Registry("correction", "correction")


def register_correction(name: str, params: Mapping[str, Any] | None = None
                        ) -> Callable[[CorrectionFn], CorrectionFn]:
    """Registers ``fn(MismatchInputs, LossConfig) -> Correction`` as ``correction=name``.

    ``params``: the hyper-parameters ``fn`` reads with ``cfg.param(key)``, as
    ``{key: registry.Param(type, default)}`` (or a bare type: required; a bare value: the
    default), checked against ``LossConfig.correction_params`` when the config is built.

    The contract (checked for every registered correction by tests/rl/test_losses.py): jittable
    and finite on any log k (masked tokens may carry ±50); weight_BT ≥ 0 and 0 where keep_BT
    is False; row-local (a row's verdict depends on that row only, so micro-batches are exact);
    c(k=1) = 1, so when the engines agree the loss is plain GRPO's.
    """
    return _CORRECTIONS.register(name, params)


def available_corrections() -> tuple[str, ...]:
    return _CORRECTIONS.names()


def get_correction(name: str) -> CorrectionFn:
    """The function of a registered or ``"module.path:function"`` correction name."""
    return _CORRECTIONS.get(name).fn


def correction_params(name: str) -> dict[str, registry.Param]:
    """The parameters correction ``name`` declares."""
    return dict(_CORRECTIONS.get(name).params)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How the policy loss is computed. Frozen and hashable: a static argument of `jax.jit`.

    Fields:
      correction: registered name; built in: "none", "tis", "icepop", "kpop", "seq_mask"; or
        "module.path:function" (the module is imported; `ring_jax.rl.registry`).
      alpha, beta: the IcePop band [α, β] on k (PAPER §1: 0.5, 5); "seq_mask" applies the same
        band to the sequence's geometric-mean k. α may be 0 and β may be inf (no bound). The
        band must contain k = 1 (α ≤ 1 ≤ β: a token both engines agree on is never masked)
        and have width (α < β: α = β = 1 would keep only tokens whose two log-probs are
        bit-identical, i.e. mask nearly all of them).
      tis_cap: C in the TIS weight min(k, C).
      kpop_phi: φ, the KPop bound on the binary KL in both directions (PAPER §1: 0.1–2).
      clip: PPO clipping on; off = the plain ratio r·Â (one update per batch, r ≡ 1 in value).
      eps_low, eps_high: clip range [1-ε_low, 1+ε_high] ("clip-higher" when ε_high > ε_low).
      aggregation: "seq_mean_token_mean" (the paper's 1/G Σ_i 1/|y_i| Σ_t), "token_mean"
        (DAPO: Σ over all tokens / number of tokens), "seq_mean_token_sum_norm" (Dr.GRPO: each
        sequence's token sum / a constant length, mean over sequences).
      masked_in_denominator: True (PAPER §1): masked tokens count in |y_i| (and in the token
        count of "token_mean"). False: only kept tokens count — |y_i| becomes the number of kept
        tokens of sequence i, and a sequence with none kept leaves the 1/G average (or the
        token count) — which inflates the kept tokens' gradients; an ablation. Only for
        "seq_mean_token_mean" and "token_mean" ("seq_mean_token_sum_norm" divides by a
        constant).
      max_response_len: the constant length of "seq_mean_token_sum_norm" and the span of the
        position buckets; None = the T of the inputs.
      kl_coef, kl_estimator: penalty kl_coef · KL(π_θ ‖ π_ref) per token with Schulman's
        k1/k2/k3 estimator (needs ``logp_ref_BT``); 0 = off, as in the paper.
      entropy_coef: bonus −entropy_coef · H per token (needs ``entropy_BT``); 0 = off.
      num_position_buckets: equal-width buckets of response position (over max_response_len
        or T) for the mismatch metrics, named ``mismatch/abs_logp_diff_mean/pos_{first}_{last}``
        (the last one ``pos_{first}_end``).
      correction_params: the hyper-parameters the correction declared at registration
        (`register_correction(name, params=...)`), a mapping (or (key, value) pairs) read with
        `param`, so a fork needs no new config field. Checked against the declaration (an
        unknown, missing or mistyped one is a `ConfigError` naming
        ``correction_params.<key>``) and completed with the declared defaults when built.
    """

    correction: str = "icepop"
    alpha: float = 0.5
    beta: float = 5.0
    tis_cap: float = 2.0
    kpop_phi: float = 0.5
    clip: bool = True
    eps_low: float = 0.2
    eps_high: float = 0.2
    aggregation: str = "seq_mean_token_mean"
    masked_in_denominator: bool = True
    max_response_len: int | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    num_position_buckets: int = 4
    correction_params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        config_lib.check(isinstance(self.correction, str), "correction", self.correction,
                         "must be a str")
        # Frozen: the resolved (sorted, defaults filled) parameters replace the given ones.
        object.__setattr__(self, "correction_params", _CORRECTIONS.resolve_params(
            self.correction, self.correction_params, "correction_params"))
        config_lib.check_float("alpha", self.alpha, min_value=0.0)
        config_lib.check_float("beta", self.beta, min_value=0.0)
        config_lib.check(self.alpha < self.beta, "alpha", self.alpha,
                         f"must be < beta={self.beta}: [α, β] is the band of k that IcePop "
                         "and seq_mask keep; α > β keeps nothing, α = β only k exactly α")
        config_lib.check(self.alpha <= 1.0, "alpha", self.alpha,
                         "must be <= 1: the band [α, β] must contain k = 1, so a token both "
                         "engines agree on is never masked")
        config_lib.check(self.beta >= 1.0, "beta", self.beta,
                         "must be >= 1: the band [α, β] must contain k = 1, so a token both "
                         "engines agree on is never masked")
        config_lib.check_float("tis_cap", self.tis_cap, min_value=0.0, min_exclusive=True)
        config_lib.check_float("kpop_phi", self.kpop_phi, min_value=0.0, min_exclusive=True)
        config_lib.check(isinstance(self.clip, bool), "clip", self.clip, "must be a bool")
        config_lib.check_float("eps_low", self.eps_low, min_value=0.0, max_value=1.0)
        config_lib.check(self.eps_low < 1.0, "eps_low", self.eps_low, "must be < 1")
        config_lib.check_float("eps_high", self.eps_high, min_value=0.0)
        config_lib.check_one_of("aggregation", self.aggregation, AGGREGATIONS)
        config_lib.check(isinstance(self.masked_in_denominator, bool), "masked_in_denominator",
                         self.masked_in_denominator, "must be a bool")
        config_lib.check(self.masked_in_denominator
                         or self.aggregation != "seq_mean_token_sum_norm",
                         "masked_in_denominator", self.masked_in_denominator,
                         "False needs aggregation 'seq_mean_token_mean' or 'token_mean' "
                         "('seq_mean_token_sum_norm' divides by a constant)")
        if self.max_response_len is not None:
            config_lib.check_int("max_response_len", self.max_response_len, min_value=1)
        config_lib.check_float("kl_coef", self.kl_coef, min_value=0.0)
        config_lib.check_one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        config_lib.check_float("entropy_coef", self.entropy_coef, min_value=0.0)
        config_lib.check_int("num_position_buckets", self.num_position_buckets, min_value=1)

    def param(self, key: str) -> Any:
        """The value of the correction's declared parameter ``key`` (default filled in)."""
        return registry.param_value(self.correction_params, key, "correction", self.correction)


# ------------------------------------------------------------------------------------------------
# Built-in corrections (PAPER §1, "Relatives to implement beside it")
# ------------------------------------------------------------------------------------------------


def _log(x: float) -> float:
    """log that maps the open band ends 0 and inf to -inf and inf."""
    return -math.inf if x == 0 else math.log(x)


def _weight_kept_by_k(x: MismatchInputs, keep_BT: jax.Array) -> Correction:
    # Exponentiate only kept log-ratios: exp of an out-of-band ±50 would give 0·inf = NaN.
    k_kept_BT = jnp.exp(jnp.where(keep_BT, x.log_k_BT, 0.0))
    return Correction(jnp.where(keep_BT, k_kept_BT, 0.0), keep_BT)


@register_correction("none")
def no_correction(x: MismatchInputs, cfg: LossConfig) -> Correction:
    """Plain GRPO: the sampler's tokens are treated as on-policy, c(k) = 1."""
    del cfg
    return Correction(jnp.ones_like(x.log_k_BT), jnp.ones_like(x.log_k_BT, dtype=bool))


@register_correction("tis")
def truncated_importance_sampling(x: MismatchInputs, cfg: LossConfig) -> Correction:
    """TIS (Yao et al. 2025): c(k) = min(k, C); one-sided, no token is masked."""
    weight_BT = jnp.exp(jnp.minimum(x.log_k_BT, _log(cfg.tis_cap)))
    return Correction(weight_BT, jnp.ones_like(x.log_k_BT, dtype=bool))


@register_correction("icepop")
def icepop(x: MismatchInputs, cfg: LossConfig) -> Correction:
    """IcePop (PAPER §1): c(k) = M(k; α, β) = k if α ≤ k ≤ β else 0; band tested in log space."""
    keep_BT = (x.log_k_BT >= _log(cfg.alpha)) & (x.log_k_BT <= _log(cfg.beta))
    return _weight_kept_by_k(x, keep_BT)


def _log1mexp(logp: jax.Array) -> jax.Array:
    """log(1 - exp(logp)) for logp <= 0, accurate at both ends (Mächler 2012)."""
    return jnp.where(logp > -math.log(2.0), jnp.log(-jnp.expm1(logp)),
                     jnp.log1p(-jnp.exp(logp)))


def binary_kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """D_B(p‖q) = p log(p/q) + (1-p) log((1-p)/(1-q)) of the token-vs-rest distributions,
    from log-probabilities (PAPER §1, KPop). 0·log(0/·) terms are 0; q = 1 > p gives inf."""
    logp = jnp.minimum(logp, 0.0)  # a recomputed log-prob can round a hair above 0
    logq = jnp.minimum(logq, 0.0)
    log1mp, log1mq = _log1mexp(logp), _log1mexp(logq)
    head = jnp.exp(logp) * (logp - logq)
    tail = jnp.where(jnp.isneginf(log1mp), 0.0, jnp.exp(log1mp) * (log1mp - log1mq))
    return head + tail


@register_correction("kpop")
def kpop(x: MismatchInputs, cfg: LossConfig) -> Correction:
    """KPop (PAPER §1, 2026 follow-up): keep a token iff the binary KL between π_train(θ_old)
    and π_infer of that token is ≤ φ in both directions; kept tokens are weighted by k."""
    kl_fwd_BT = binary_kl(x.logp_old_BT, x.logp_infer_BT)
    kl_bwd_BT = binary_kl(x.logp_infer_BT, x.logp_old_BT)
    keep_BT = (kl_fwd_BT <= cfg.kpop_phi) & (kl_bwd_BT <= cfg.kpop_phi)
    return _weight_kept_by_k(x, keep_BT)


@register_correction("seq_mask")
def sequence_mask(x: MismatchInputs, cfg: LossConfig) -> Correction:
    """Sequence-level mask (MIS-style, PAPER §1): keep a whole sequence iff the geometric mean
    of its tokens' k, exp(mean_t log k), lies in [α, β]; kept tokens get weight 1."""
    num_tokens_B = x.mask_BT.sum(-1)
    mean_log_k_B = (x.log_k_BT * x.mask_BT).sum(-1) / jnp.maximum(num_tokens_B, 1.0)
    keep_B = (mean_log_k_B >= _log(cfg.alpha)) & (mean_log_k_B <= _log(cfg.beta))
    keep_BT = jnp.broadcast_to(keep_B[:, None], x.log_k_BT.shape)
    return Correction(keep_BT.astype(jnp.float32), keep_BT)


# ------------------------------------------------------------------------------------------------
# Sum/denominator terms
# ------------------------------------------------------------------------------------------------


class LossTerms(NamedTuple):
    """Additive pieces of the loss and metrics of one (micro-)batch; a pytree.

    ``loss_sum / denominator`` is the loss; `accumulate_terms` adds pieces (maxima are maxed),
    `finalize` turns them into the loss and the metrics dict.
    """

    loss_sum: jax.Array
    denominator: jax.Array
    sums: dict[str, jax.Array]
    maxes: dict[str, jax.Array]


def _apply_correction(logp_old_BT: jax.Array, logp_infer_BT: jax.Array, mask_BT: jax.Array,
                      cfg: LossConfig) -> tuple[jax.Array, Correction]:
    """(log k [B, T], the correction's verdict). float32 inputs; mask_BT 1.0 on responses."""
    # k = π_train(θ_old) / π_infer(θ_old) stays in log space; 0 outside the response so that
    # padding never reaches an exp.
    log_k_BT = jnp.where(mask_BT > 0, logp_old_BT - logp_infer_BT, 0.0)
    correction = get_correction(cfg.correction)(
        MismatchInputs(log_k_BT, logp_old_BT, logp_infer_BT, mask_BT), cfg)
    return log_k_BT, correction


def kept_tokens(logp_old_BT: jax.Array, logp_infer_BT: jax.Array, mask_BT: jax.Array,
                cfg: LossConfig) -> jax.Array:
    """bool [B, T]: the response tokens the correction keeps (the rest are masked)."""
    sg, f32 = jax.lax.stop_gradient, jnp.float32
    mask_BT = mask_BT.astype(f32)
    _, correction = _apply_correction(sg(logp_old_BT.astype(f32)),
                                      sg(logp_infer_BT.astype(f32)), mask_BT, cfg)
    return correction.keep_BT.astype(bool) & (mask_BT > 0)


def loss_denominator(mask_BT: jax.Array, cfg: LossConfig,
                     keep_BT: jax.Array | None = None) -> jax.Array:
    """The loss's denominator for a batch: its response-token count for "token_mean", else its
    number of sequences with at least one response token (all-padding rows do not count).

    With ``cfg.masked_in_denominator=False`` only the tokens in ``keep_BT`` (`kept_tokens`,
    required then) count: kept tokens, or sequences with at least one kept token.
    """
    counted_BT = mask_BT.astype(jnp.float32)
    if not cfg.masked_in_denominator:
        if keep_BT is None:
            raise ValueError("LossConfig.masked_in_denominator=False needs keep_BT "
                             "(losses.kept_tokens)")
        counted_BT = counted_BT * keep_BT.astype(jnp.float32)
    if cfg.aggregation == "token_mean":
        return counted_BT.sum()
    return (counted_BT.sum(-1) > 0).sum().astype(jnp.float32)


def accumulate_terms(a: LossTerms, b: LossTerms) -> LossTerms:
    """Terms of the union of two disjoint sets of rows."""
    return LossTerms(a.loss_sum + b.loss_sum, a.denominator + b.denominator,
                     jax.tree.map(jnp.add, a.sums, b.sums),
                     jax.tree.map(jnp.maximum, a.maxes, b.maxes))


def _kl_penalty(logp_BT: jax.Array, logp_ref_BT: jax.Array, estimator: str) -> jax.Array:
    """Schulman's estimators of KL(π_θ ‖ π_ref) on samples, with log ρ = log π_ref − log π_θ."""
    log_rho_BT = logp_ref_BT - logp_BT
    if estimator == "k1":
        return -log_rho_BT
    if estimator == "k2":
        return 0.5 * jnp.square(log_rho_BT)
    return jnp.expm1(log_rho_BT) - log_rho_BT  # k3: unbiased, non-negative


def _position_buckets(mask_BT: jax.Array, span: int, num_buckets: int
                      ) -> tuple[jax.Array, list[str]]:
    """One-hot [B, T, nb] of each response token's bucket of response position, and names."""
    width = -(-span // num_buckets)
    position_BT = jnp.cumsum(mask_BT, axis=-1) - 1.0  # index within the response
    bucket_BT = jnp.clip(position_BT // width, 0, num_buckets - 1).astype(jnp.int32)
    names = [f"pos_{b * width}_{min((b + 1) * width, span) - 1}" if b < num_buckets - 1
             else f"pos_{b * width}_end" for b in range(num_buckets)]
    return jax.nn.one_hot(bucket_BT, num_buckets) * mask_BT[..., None], names


class TokenTerms(NamedTuple):
    """The per-token quantities of a batch's loss, [B, T] float32 constants (no gradient), from
    which `loss_metric_sums` takes the metrics. Zero outside the response."""

    mask_BT: jax.Array  # 1.0 on response tokens
    log_k_BT: jax.Array  # log k = log π_train(θ_old) − log π_infer
    weight_BT: jax.Array  # the correction's c(k)
    masked_BT: jax.Array  # 1.0 on response tokens the correction masked
    log_ratio_BT: jax.Array  # log r = log π_train(θ) − log π_train(θ_old), every response token
    adv_BT: jax.Array  # Â
    token_loss_BT: jax.Array  # the token's term of the loss (before aggregation)
    kl_BT: jax.Array | None  # the KL penalty's estimate (cfg.kl_coef > 0)
    entropy_BT: jax.Array | None  # H of π_θ, when given


def policy_loss_terms(logp_BT: jax.Array, logp_old_BT: jax.Array, logp_infer_BT: jax.Array,
                      advantages: jax.Array, mask_BT: jax.Array, cfg: LossConfig, *,
                      logp_ref_BT: jax.Array | None = None,
                      entropy_BT: jax.Array | None = None) -> LossTerms:
    """The loss and metric sums of a batch of rows (see the module docstring).

    Args:
      logp_BT: log π_train(y_t | θ) of the sampled tokens; the only input with a gradient.
      logp_old_BT: log π_train(y_t | θ_old), recomputed by the trainer before the update.
      logp_infer_BT: log π_infer(y_t | θ_old), recorded by the sampler.
      advantages: Â per sequence [B] or per token [B, T].
      mask_BT: 1.0 on response tokens, 0.0 on prompt and padding.
      cfg: the LossConfig.
      logp_ref_BT: log π_ref for the KL penalty (needed iff cfg.kl_coef > 0).
      entropy_BT: per-token entropy of π_θ (from `logprobs`); needed iff cfg.entropy_coef > 0,
        and when given the metrics report the entropy of masked vs all response tokens.
    """
    f32 = jnp.float32
    mask_BT = mask_BT.astype(f32)
    on_BT = mask_BT > 0
    num_rows, num_cols = mask_BT.shape
    sg = jax.lax.stop_gradient
    logp_BT = logp_BT.astype(f32)
    logp_old_BT = sg(logp_old_BT.astype(f32))
    logp_infer_BT = sg(logp_infer_BT.astype(f32))
    adv_BT = sg(advantages.astype(f32))
    if adv_BT.ndim == 1:
        adv_BT = adv_BT[:, None]
    adv_BT = jnp.broadcast_to(adv_BT, (num_rows, num_cols))

    log_k_BT, correction = _apply_correction(logp_old_BT, logp_infer_BT, mask_BT, cfg)
    weight_BT = sg(jnp.where(on_BT, correction.weight_BT.astype(f32), 0.0))
    keep_BT = correction.keep_BT.astype(bool) | ~on_BT

    # PPO ratio r = π(θ)/π(θ_old). Tokens that are masked (or padding) see log r = 0 through a
    # select, so their gradient is exactly zero even when their log r is extreme.
    active_BT = on_BT & (weight_BT > 0)
    log_r_BT = jnp.where(active_BT, logp_BT - logp_old_BT, 0.0)
    ratio_BT = jnp.exp(log_r_BT)
    if cfg.clip:
        ratio_clipped_BT = jnp.clip(ratio_BT, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
        pg_BT = jnp.minimum(ratio_BT * adv_BT, ratio_clipped_BT * adv_BT)
    else:
        pg_BT = ratio_BT * adv_BT
    token_loss_BT = -weight_BT * pg_BT
    kl_BT = None
    if cfg.kl_coef > 0:
        if logp_ref_BT is None:
            raise ValueError("LossConfig.kl_coef > 0 needs logp_ref_BT")
        log_ref_BT = jnp.where(on_BT, sg(logp_ref_BT.astype(f32)), 0.0)
        kl_BT = _kl_penalty(jnp.where(on_BT, logp_BT, 0.0), log_ref_BT, cfg.kl_estimator)
        token_loss_BT = token_loss_BT + cfg.kl_coef * kl_BT
    if entropy_BT is not None:
        entropy_BT = jnp.where(on_BT, entropy_BT.astype(f32), 0.0)
    if cfg.entropy_coef > 0:
        if entropy_BT is None:
            raise ValueError("LossConfig.entropy_coef > 0 needs entropy_BT")
        token_loss_BT = token_loss_BT - cfg.entropy_coef * entropy_BT
    token_loss_BT = jnp.where(on_BT, token_loss_BT, 0.0)

    # Aggregation: numerator here, denominator from `loss_denominator`.
    kept_BT = mask_BT * keep_BT
    counted_BT = mask_BT if cfg.masked_in_denominator else kept_BT
    if cfg.aggregation == "seq_mean_token_mean":
        # |y_i|: masked tokens are still in it (PAPER §1) unless masked_in_denominator=False.
        loss_sum = (token_loss_BT.sum(-1) / jnp.maximum(counted_BT.sum(-1), 1.0)).sum()
    elif cfg.aggregation == "token_mean":
        loss_sum = token_loss_BT.sum()
    else:  # seq_mean_token_sum_norm
        loss_sum = token_loss_BT.sum() / (cfg.max_response_len or num_cols)

    tokens = TokenTerms(
        mask_BT=mask_BT, log_k_BT=sg(log_k_BT), weight_BT=weight_BT,
        masked_BT=mask_BT * (~keep_BT),
        log_ratio_BT=jnp.where(on_BT, sg(logp_BT) - logp_old_BT, 0.0), adv_BT=adv_BT,
        token_loss_BT=sg(token_loss_BT), kl_BT=None if kl_BT is None else sg(kl_BT),
        entropy_BT=None if entropy_BT is None else sg(entropy_BT))
    sums, maxes = loss_metric_sums(tokens, cfg)
    return LossTerms(loss_sum, loss_denominator(mask_BT, cfg, kept_BT), sums, maxes)


def loss_metric_sums(t: TokenTerms, cfg: LossConfig
                     ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The numerators (sums over response tokens) and maxima of the metrics of a batch, which
    `accumulate_terms` adds across micro-batches and `finalize_metrics` divides.

    Mismatch (PAPER §1, IcePop blog Figs 5-10): |log k| (mean, max, per response-position
    bucket), the k3 estimate of KL(π_infer ‖ π_train(θ_old)), k, the masked fraction (above β /
    below α by the sign of log k), the correction weights (mean, ESS). Policy: the PPO ratio,
    the clipped fraction, the token loss, the KL penalty and the entropy of all vs masked
    tokens. All cheap [B, T] elementwise work on constants.
    """
    mask_BT, log_k_BT, masked_BT = t.mask_BT, t.log_k_BT, t.masked_BT
    abs_diff_BT = jnp.abs(log_k_BT)
    ratio_BT = jnp.exp(t.log_ratio_BT)
    if cfg.clip:
        # Tokens whose clipped term is the min, i.e. that get no gradient.
        lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
        clipped_BT = ((ratio_BT < lo) & (t.adv_BT < 0)) | ((ratio_BT > hi) & (t.adv_BT > 0))
    else:
        clipped_BT = jnp.zeros(mask_BT.shape, bool)
    sums = {
        "tokens": mask_BT.sum(),
        "sequences": (mask_BT.sum(-1) > 0).sum().astype(jnp.float32),
        "abs_diff": (abs_diff_BT * mask_BT).sum(),
        # k3 estimator of KL(π_infer ‖ π_train(θ_old)) from the sampler's own samples.
        "k3_kl": ((jnp.expm1(log_k_BT) - log_k_BT) * mask_BT).sum(),
        "k": (jnp.exp(log_k_BT) * mask_BT).sum(),
        "masked": masked_BT.sum(),
        "masked_above": (masked_BT * (log_k_BT > 0)).sum(),
        "masked_below": (masked_BT * (log_k_BT < 0)).sum(),
        "weight": (t.weight_BT * mask_BT).sum(),
        "weight_sq": (jnp.square(t.weight_BT) * mask_BT).sum(),
        "ratio": (ratio_BT * mask_BT).sum(),
        "clipped": (clipped_BT * mask_BT).sum(),
        "token_loss": t.token_loss_BT.sum(),
    }
    maxes = {"abs_diff": (abs_diff_BT * mask_BT).max()}
    span = cfg.max_response_len or mask_BT.shape[1]
    bucket_BTN, bucket_names = _position_buckets(mask_BT, span, cfg.num_position_buckets)
    bucket_tokens_N = bucket_BTN.sum((0, 1))
    bucket_abs_diff_N = (bucket_BTN * abs_diff_BT[..., None]).sum((0, 1))
    bucket_max_N = (bucket_BTN * abs_diff_BT[..., None]).max((0, 1))
    for b, name in enumerate(bucket_names):
        sums[f"tokens/{name}"] = bucket_tokens_N[b]
        sums[f"abs_diff/{name}"] = bucket_abs_diff_N[b]
        maxes[f"abs_diff/{name}"] = bucket_max_N[b]
    if t.entropy_BT is not None:
        sums["entropy"] = (t.entropy_BT * mask_BT).sum()
        sums["entropy_masked"] = (t.entropy_BT * masked_BT).sum()
    if t.kl_BT is not None:
        sums["kl_ref"] = (t.kl_BT * mask_BT).sum()
    return sums, maxes


def _div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (an empty batch or bucket)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def finalize_metrics(terms: LossTerms) -> dict[str, jax.Array]:
    """Metrics (STYLE.md prefixes) from accumulated terms; means are over response tokens."""
    s, m = terms.sums, terms.maxes
    tokens = s["tokens"]
    metrics = {
        "rl/loss": _div(terms.loss_sum, terms.denominator),
        "rl/token_loss_mean": _div(s["token_loss"], tokens),
        "rl/ratio_mean": _div(s["ratio"], tokens),
        "rl/clip_frac": _div(s["clipped"], tokens),
        "rl/response_tokens": tokens,
        "rl/sequences": s["sequences"],
        "mismatch/k3_kl": _div(s["k3_kl"], tokens),
        "mismatch/k_mean": _div(s["k"], tokens),
        "mismatch/abs_logp_diff_mean": _div(s["abs_diff"], tokens),
        "mismatch/abs_logp_diff_max": m["abs_diff"],
        "mismatch/masked_frac": _div(s["masked"], tokens),
        "mismatch/masked_frac_above": _div(s["masked_above"], tokens),
        "mismatch/masked_frac_below": _div(s["masked_below"], tokens),
        "mismatch/weight_mean": _div(s["weight"], tokens),
        # Normalised effective sample size of the correction weights, in [0, 1]:
        # (Σw)² / (N Σw²); 1 when all weights are equal.
        "mismatch/ess": _div(jnp.square(s["weight"]), tokens * s["weight_sq"]),
    }
    for key in s:
        if key.startswith("abs_diff/"):
            name = key.split("/", 1)[1]
            metrics[f"mismatch/abs_logp_diff_mean/{name}"] = _div(s[key], s[f"tokens/{name}"])
            metrics[f"mismatch/abs_logp_diff_max/{name}"] = m[key]
    if "entropy" in s:
        metrics["rl/entropy_all_tokens"] = _div(s["entropy"], tokens)
        metrics["rl/entropy_masked_tokens"] = _div(s["entropy_masked"], s["masked"])
    if "kl_ref" in s:
        metrics["rl/kl_ref"] = _div(s["kl_ref"], tokens)
    return metrics


def finalize(terms: LossTerms, normaliser: jax.Array | float | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics). ``normaliser`` replaces the terms' own denominator (a micro-batch's loss
    over the whole minibatch's `loss_denominator`)."""
    den = terms.denominator if normaliser is None else jnp.asarray(normaliser, jnp.float32)
    return _div(terms.loss_sum, den), finalize_metrics(terms)


def policy_loss(logp_BT: jax.Array, logp_old_BT: jax.Array, logp_infer_BT: jax.Array,
                advantages: jax.Array, mask_BT: jax.Array, cfg: LossConfig, *,
                logp_ref_BT: jax.Array | None = None, entropy_BT: jax.Array | None = None,
                normaliser: jax.Array | float | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """−J of PAPER §1 (the scalar to minimise) and its metrics, for one batch.

    Arguments as in `policy_loss_terms`; ``normaliser`` (e.g. `loss_denominator` of the full
    minibatch) makes a micro-batch's loss a summable share of the minibatch's loss.
    """
    terms = policy_loss_terms(logp_BT, logp_old_BT, logp_infer_BT, advantages, mask_BT, cfg,
                              logp_ref_BT=logp_ref_BT, entropy_BT=entropy_BT)
    return finalize(terms, normaliser)

"""Pure jittable RL math (PAPER §1): no models, engines or schedulers in here.

  logprobs    per-token log-probs and entropy from hidden states, chunked over the sequence
  advantages  group-relative advantages (GRPO, Dr.GRPO, RLOO), degenerate groups
  losses      the clipped policy loss with registered mismatch corrections (IcePop, TIS, KPop,
              sequence masks), sum/denominator terms for exact micro-batching, mismatch metrics
  registry    named functions (corrections, estimators) with typed, validated parameters;
              "module.path:function" names for forks in their own modules
"""

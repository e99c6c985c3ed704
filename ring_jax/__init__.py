"""ring_jax: the Ring-1T reinforcement-learning system in JAX/Flax.

Layers (imports point downward only; see BUILD.md and ../shared/DESIGN.md):

  plan/       ahead-of-time compile of the run's programs for a TPU topology (will it fit?)
  train/      RL and SFT loops, checkpointing, metrics
  scheduler/  C3PO++ / sync / async rollout schedulers (host-side)
  rollout/    inference engine: KV cache, continuous batching, sampling, weight sync
  data/       tokenizers, tasks + verifiers, code sandbox, grain pipelines
  rl/         pure jittable RL math: log-probs, advantages, policy losses, IcePop
  model/      Ling-2.0 MoE transformer (Flax linen), MoE dispatch, presets, HF import
  sharding.py mesh construction and the logical-axis rules table
  config.py   validation helpers shared by the frozen config dataclasses

Shape-letter glossary used in variable names (``logp_BT``, ``w_up_EDF``) and einsums:

  B  batch (sequences)           T  tokens (sequence positions; query length)
  S  cache / key length          D  model (hidden) dimension
  F  feed-forward (intermediate) E  routed experts
  K  experts chosen per token    C  expert capacity (tokens per expert)
  H  attention (query) heads     N  key/value heads (GQA)
  Q  head dimension              G  group size (responses per prompt) or expert groups
  V  vocabulary                  L  layers
  X  flattened tokens (B*T)
"""

__version__ = "0.1.0"

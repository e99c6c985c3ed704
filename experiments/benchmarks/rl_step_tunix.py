"""Tunix 0.1.7's `GRPOLearner` on its Qwen3 MoE, as issue 16's peer of ring_jax's RL iteration.

`rl_step.py --peer=tunix` builds this next to ring_jax's iteration and times both in one
process, interleaved (ring_jax, Tunix, ring_jax, Tunix, ...). Everything Tunix needs is built
here, nothing is downloaded:

  model      `tunix.models.qwen3.Qwen3` with the shape of the ring_jax config (`qwen3_config`:
             layers, d, heads × head_dim, KV heads, E experts top-K with softmax routing and
             renormalised top-K weights, expert FFN, qk-norm, untied head), random init, f32.
  tokenizer  `ByteTokenizer`: bytes shifted by 1; pad and EOS are the id `vocab_size`, outside
             the vocabulary, so the sampler never draws them: every response runs the full
             ``new_tokens`` (ring_jax forces the same with ``min_new_tokens``) and every
             completion token is trained on.
  prompts    `synthetic_prompts`: exactly ``prompt_len`` bytes each, so the sampler's prompt
             buffer holds no padding (``max_prompt_length = prompt_len``).
  reward     `digit_reward`: the fraction of decimal digits in the completion (a tiny synthetic
             reward; its cost is negligible on both sides).
  learner    `GRPOConfig(num_generations=G, num_iterations=1, beta=0)`: one optimizer update per
             batch of P prompts × G, no reference model, no θ_old forward (num_iterations = 1
             makes θ_old = θ; ring_jax's ``--logp_old_from_update`` is the same), vanilla
             rollout (Tunix's own sampler, sharing the actor's f32 weights: no weight sync),
             temperature 1, top_p 1, checkpointing and metric backends off; the optimizer is
             the optax transformation the caller passes (ring_jax's, so both take the same
             AdamW step).

On CPU, Tunix's `MoELayer` runs its dense path (every expert on every token, the one-hot
dispatch einsum, then the top-K mix: E/K = 4× the routed FLOPs at this shape); its megablox
path needs a TPU/GPU mesh. That is Tunix's CPU behaviour, measured as is.

`TunixPeer` drives the learner's public ``train()`` in a thread of its own, one GRPO iteration
per ``run_iteration()``: the prompt iterator handed to ``train()`` blocks until the caller asks
for the next iteration, so the caller's own work never overlaps Tunix's. An iteration's time
runs from handing out a batch to Tunix asking for the next one, after its parameters are
ready (`jax.block_until_ready`). A fault in Tunix's threads is re-raised in the caller's.

Tunix's time breakdown: ``rollout`` (`RLCluster.generate`: the sampler's prefill + decode and
detokenisation), ``reward_advantage`` (rewards, group advantages, assembling the batch) and
``update`` (the rest of the iteration: the jitted train step, i.e. its forward + backward +
AdamW, and Tunix's loop and metric bookkeeping).

Needs ``google-tunix==0.1.7`` (``pip install -e ".[peer]"``, best in a virtualenv of its own).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import queue
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ring_jax.model import ModelConfig

TUNIX_VERSION = "0.1.7"
MISSING_TUNIX = ("--peer=tunix needs google-tunix==" + TUNIX_VERSION
                 + " (pip install -e \".[peer]\"), which is not installed")

try:
    from flax import nnx
    from tunix.models.qwen3 import model as qwen3
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
except ModuleNotFoundError as e:  # only tunix's own absence: any other import error surfaces
    if e.name is None or not e.name.startswith("tunix"):
        raise
    raise ModuleNotFoundError(MISSING_TUNIX) from None

if importlib.metadata.version("google-tunix") != TUNIX_VERSION:
    raise ImportError(f"--peer=tunix is written against google-tunix=={TUNIX_VERSION}; found "
                      f"{importlib.metadata.version('google-tunix')}")

# ring_jax's aggregation names -> Tunix's `loss_agg_mode`.
LOSS_AGG_MODES = {"seq_mean_token_mean": "sequence-mean-token-mean",
                  "token_mean": "token-mean",
                  "seq_mean_token_sum_norm": "sequence-mean-token-sum-norm"}


def qwen3_config(cfg: ModelConfig) -> qwen3.ModelConfig:
    """Tunix's Qwen3 MoE config with the shape of `cfg`, which must be Qwen3-MoE shaped (every
    layer MoE, no shared expert, softmax routing with renormalised top-K, full RoPE, qk-norm)."""
    qwen3_shaped = {"first_k_dense_replace": 0, "num_shared_experts": 0, "n_group": 1,
                    "score_function": "softmax", "norm_topk_prob": True,
                    "routed_scaling_factor": 1.0, "partial_rotary_factor": 1.0,
                    "use_qk_norm": True, "num_mtp_layers": 0}
    for field, want in qwen3_shaped.items():
        if getattr(cfg, field) != want or cfg.num_experts == 0:
            raise ValueError(f"model.{field}={getattr(cfg, field)!r}: the Tunix peer needs a "
                             f"Qwen3-MoE shape ({field}={want!r}, num_experts > 0)")
    return qwen3.ModelConfig(
        num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size,
        hidden_dim=cfg.moe_intermediate_size, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
        num_kv_heads=cfg.num_kv_heads, rope_theta=int(cfg.rope_theta), norm_eps=cfg.rms_norm_eps,
        use_tied_embedding=False, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, dtype=jnp.float32,
        param_dtype=jnp.float32)


class ByteTokenizer:
    """The five methods Tunix's `TokenizerAdapter` asks of a tokenizer: UTF-8 bytes as ids
    1..256; pad = EOS = ``vocab_size`` (never sampled); no BOS (id 0 means none to Tunix)."""

    def __init__(self, vocab_size: int):
        if vocab_size < 257:
            raise ValueError(f"model.vocab_size={vocab_size}: the byte tokenizer needs >= 257")
        self.vocab_size = vocab_size

    def encode(self, text: str, **_) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, ids, **_) -> str:
        return bytes(i - 1 for i in ids if 1 <= i <= 256).decode(errors="replace")

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return self.vocab_size

    def pad_id(self) -> int:
        return self.vocab_size


def synthetic_prompts(num_prompts: int, prompt_len: int, seed: int) -> list[str]:
    """`num_prompts` addition questions, each padded with spaces to exactly `prompt_len`
    bytes."""
    rng = np.random.default_rng(seed)
    out = []
    for a, b in rng.integers(10, 1000, size=(num_prompts, 2)):
        text = f"What is {a} + {b}? Answer:"
        out.append(text[:prompt_len].ljust(prompt_len))
    return out


def digit_reward(prompts, completions, **_) -> list[float]:
    """Fraction of the completion's characters that are decimal digits."""
    del prompts
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


class _TimedGRPOLearner(grpo_learner.GRPOLearner):
    """`GRPOLearner` that records, per batch, the seconds of its rollout and of rollout +
    reward + advantages, and the batch's shape and trained-token count (the same-work check)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last: dict[str, Any] = {}
        generate = self.rl_cluster.generate

        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            out = generate(*a, **kw)  # returns host lists: already synchronous
            self.last["rollout"] = time.perf_counter() - t0
            return out

        self.rl_cluster.generate = timed_generate

    def _generate_and_compute_advantage(self, training_input, mode=rl_cluster_lib.Mode.TRAIN):
        t0 = time.perf_counter()
        example = super()._generate_and_compute_advantage(training_input, mode)
        jax.block_until_ready(example.advantages)
        self.last["rollout_reward_advantage"] = time.perf_counter() - t0
        self.last["rows"] = int(example.completion_ids.shape[0])
        self.last["completion_len"] = int(example.completion_ids.shape[1])
        self.last["prompt_len"] = int(example.prompt_ids.shape[1])
        self.last["tokens"] = int(np.asarray(example.completion_mask).sum())
        return example


_STOP = object()


@dataclasses.dataclass(frozen=True)
class TunixIteration:
    """One measured Tunix GRPO iteration."""
    total: float
    rollout: float
    reward_advantage: float
    update: float
    tokens: int            # trained completion tokens (completion mask sum)
    rows: int              # responses in the batch (prompts × G)
    completion_len: int    # generated tokens per response
    prompt_len: int
    updates: int           # optimizer updates applied in the iteration


class TunixPeer:
    """Tunix's GRPO learner on the Qwen3 MoE of `cfg`'s shape, one iteration per call."""

    def __init__(self, cfg: ModelConfig, tx, *, num_prompts: int, group_size: int,
                 prompt_len: int, new_tokens: int, loss_aggregation: str, seed: int = 0,
                 reward_fn=digit_reward):
        if loss_aggregation not in LOSS_AGG_MODES:
            raise ValueError(f"rl.loss.aggregation={loss_aggregation!r}: the Tunix peer knows "
                             f"{sorted(LOSS_AGG_MODES)}")
        self.model_config = qwen3_config(cfg)
        self.tokenizer = ByteTokenizer(cfg.vocab_size)
        # An array, as a batching data loader gives (Tunix repeats it G times with np.repeat).
        self._batch = {"prompts": np.array(synthetic_prompts(num_prompts, prompt_len, seed))}
        for p in self._batch["prompts"]:
            assert len(self.tokenizer.encode(p)) == prompt_len
        mesh = jax.make_mesh((1, 1), ("fsdp", "tp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
        with mesh:
            model = qwen3.Qwen3(self.model_config, rngs=nnx.Rngs(params=seed))
        self.num_params = param_count(model)
        rollout_config = base_rollout.RolloutConfig(
            max_tokens_to_generate=new_tokens, max_prompt_length=prompt_len,
            kv_cache_size=prompt_len + new_tokens, temperature=1.0, top_p=1.0, top_k=None,
            eos_tokens=[self.tokenizer.eos_id()])
        training_config = rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=tx, eval_every_n_steps=10**9, max_steps=10**9,
            mini_batch_size=num_prompts, train_micro_batch_size=num_prompts,
            checkpoint_root_directory=None, metrics_logging_options=None,
            pbar_description=None)
        cluster = rl_cluster_lib.RLCluster(
            actor=model, reference=None, tokenizer=self.tokenizer,
            cluster_config=rl_cluster_lib.ClusterConfig(
                role_to_mesh={r: mesh for r in (rl_cluster_lib.Role.ACTOR,
                                                 rl_cluster_lib.Role.REFERENCE,
                                                 rl_cluster_lib.Role.ROLLOUT)},
                rollout_engine="vanilla", offload_to_cpu=False,
                training_config=training_config, rollout_config=rollout_config))
        self.learner = _TimedGRPOLearner(
            rl_cluster=cluster,
            algo_config=grpo_learner.GRPOConfig(
                num_generations=group_size, num_iterations=1, beta=0.0, epsilon=0.2,
                loss_agg_mode=LOSS_AGG_MODES[loss_aggregation]),
            reward_fns=reward_fn)
        self.param_dtype = jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype
        self.rollout_dtype = jax.tree.leaves(
            nnx.state(cluster.rollout.model(), nnx.Param))[0].dtype
        self._go: queue.Queue = queue.Queue()      # caller -> Tunix: run one more, or _STOP
        self._done: queue.Queue = queue.Queue()    # Tunix -> caller: an iteration's times
        self._stopped = False
        self._thread = threading.Thread(target=self._train, name="tunix-peer", daemon=True)
        self._thread.start()

    # -- Tunix's side (its own threads) ------------------------------------------------------
    def _batches(self):
        """The iterator `train()` reads: yields one batch per caller request."""
        if self._go.get() is _STOP:
            return
        while True:
            steps = self.learner.rl_cluster.actor_trainer.train_steps
            t0 = time.perf_counter()
            yield dict(self._batch)
            # Tunix asks for the next batch once the previous global step is done.
            jax.block_until_ready(nnx.state(self.learner.rl_cluster.actor_trainer.model))
            total = time.perf_counter() - t0
            last = self.learner.last
            self._done.put(TunixIteration(
                total=total, rollout=last["rollout"],
                reward_advantage=last["rollout_reward_advantage"] - last["rollout"],
                update=total - last["rollout_reward_advantage"], tokens=last["tokens"],
                rows=last["rows"], completion_len=last["completion_len"],
                prompt_len=last["prompt_len"],
                updates=self.learner.rl_cluster.actor_trainer.train_steps - steps))
            if self._go.get() is _STOP:
                return

    def _train(self):
        try:
            self.learner.train(self._batches())
        except StopIteration:
            pass  # closed before the first iteration: train() reads its first batch eagerly
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
            self._done.put(e)
        self._done.put(_STOP)

    # -- the caller's side -------------------------------------------------------------------
    def run_iteration(self) -> TunixIteration:
        """Runs one GRPO iteration (rollout -> reward -> advantages -> one update) and returns
        its times; Tunix's errors are re-raised here."""
        if self._stopped or not self._thread.is_alive():
            raise RuntimeError("the Tunix peer has stopped")
        self._go.put(None)
        out = self._done.get()
        self._stopped = not isinstance(out, TunixIteration)
        if isinstance(out, BaseException):
            raise RuntimeError("the Tunix peer failed") from out
        if out is _STOP:
            raise RuntimeError("Tunix's train() returned before the iteration ran")
        return out

    def close(self):
        if self._thread.is_alive():
            self._go.put(_STOP)
            self._thread.join()
            while not self._done.empty():
                out = self._done.get()
                if isinstance(out, BaseException):
                    raise RuntimeError("the Tunix peer failed while stopping") from out

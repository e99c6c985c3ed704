"""The SFT stage: teacher-forced next-token cross entropy on a task's worked solutions.

Ring-1T's recipe starts RL from a Long-CoT SFT model (PAPER §5); here a tiny model is
warm-started on a procedural task's worked solutions so GRPO has a non-zero reward signal.

Data: each example is a task record rendered as chat prompt + worked solution + EOS. Inputs are
tokens[:-1], targets tokens[1:], and the loss mask keeps only targets inside the response (the
model is not taught to write prompts). Examples are packed next-fit into rows of `seq_len`:
one row holds several examples, each with its own segment id (1, 2, ...; 0 = padding) and
positions restarting at 0, so attention never crosses examples. Packing the (input, target)
pairs rather than raw sequences means no target ever belongs to the next example.

The example stream is a pure function of (task, seed, position): epoch e visits the task's
indices 0..num_examples-1 in a permutation seeded by (seed, e). The iterator state is the
position of the next unconsumed example, so a restored run sees exactly the same batches.

    step_fn = jax.jit(make_sft_train_step(model, tx, cfg), donate_argnums=0)
    state, metrics = step_fn(state, batch)

`train_sft` runs the whole stage (checkpoints and metrics in a directory, resumable).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ring_jax import config as config_lib
from ring_jax.train import checkpoint as checkpoint_lib
from ring_jax.train import health, integrity
from ring_jax.train import metrics as metrics_lib
from ring_jax.train import optim, preemption
from ring_jax.train import router_bias

SFTState = dict   # {"step", "params", "opt_state", "router"}: a dict so subsets restore by name


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """seq_len: tokens per packed row; batch_size: rows per step.
    num_steps: optimizer steps of the stage.
    num_examples: task indices per epoch (0..n-1, reshuffled every epoch).
    thinking: chat template mode (see ring_jax.data.tokenizer); must match the RL stage.
    router_bias_rate: u of the aux-loss-free expert-bias update (0 disables).
    z_loss_coef / seq_aux_loss_coef: weights of the router z-loss and sequence balance loss.
    log_every: steps between console lines (metrics are recorded every step).
    seed: data order and problems; in an experiment it is the ``sft`` stream of the run seed
    (`ring_jax.train.derive`), not set directly.
    """
    seq_len: int = 128
    batch_size: int = 8
    num_steps: int = 200
    num_examples: int = 100_000
    seed: int = 0
    thinking: bool = True
    router_bias_rate: float = 1e-3
    z_loss_coef: float = 0.0
    seq_aux_loss_coef: float = 0.0
    log_every: int = 10

    def __post_init__(self):
        config_lib.check_int("seq_len", self.seq_len, min_value=2)
        config_lib.check_int("batch_size", self.batch_size, min_value=1)
        config_lib.check_int("num_steps", self.num_steps, min_value=0)
        config_lib.check_int("num_examples", self.num_examples, min_value=1)
        config_lib.check_int("seed", self.seed, min_value=0)
        config_lib.check(isinstance(self.thinking, bool), "thinking", self.thinking,
                         "must be a bool")
        config_lib.check_float("router_bias_rate", self.router_bias_rate, min_value=0.0)
        config_lib.check_float("z_loss_coef", self.z_loss_coef, min_value=0.0)
        config_lib.check_float("seq_aux_loss_coef", self.seq_aux_loss_coef, min_value=0.0)
        config_lib.check_int("log_every", self.log_every, min_value=1)


# ----------------------------------------------------------------------------- data


def make_example(prompt_ids, response_ids) -> dict[str, np.ndarray]:
    """(inputs, targets, loss_mask) of one prompt + response (response already ends in EOS).

    loss_mask[t] = 1 where targets[t] is a response token.
    """
    ids = np.asarray(list(prompt_ids) + list(response_ids), np.int32)
    if len(ids) < 2:
        raise ValueError("an SFT example needs at least 2 tokens")
    inputs, targets = ids[:-1], ids[1:]
    loss_mask = (np.arange(1, len(ids)) >= len(prompt_ids)).astype(np.int32)
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


def record_example(record, tokenizer, thinking: bool = True) -> dict[str, np.ndarray]:
    """A task record (`PromptRecord`) as an SFT example: chat prompt -> worked solution + EOS."""
    prompt = tokenizer.encode(tokenizer.apply_chat_template(record.prompt, thinking=thinking))
    response = tokenizer.encode(record.solution_text(thinking)) + [tokenizer.eos_id]
    return make_example(prompt, response)


def empty_rows(num_rows: int, seq_len: int) -> dict[str, np.ndarray]:
    zeros = lambda: np.zeros((num_rows, seq_len), np.int32)
    return {"tokens": zeros(), "targets": zeros(), "loss_mask": zeros(), "segment_ids": zeros(),
            "positions": zeros()}


def pack_next_fit(examples: Iterator[Mapping[str, np.ndarray]] | list, num_rows: int,
                  seq_len: int, pending: Mapping[str, np.ndarray] | None = None):
    """Packs examples into `num_rows` rows of `seq_len`: each example goes into the current row
    if it fits, else starts the next row. Examples longer than a row are cut to `seq_len`.

    Returns (batch, pending, consumed, truncated): `pending` is the example that did not fit
    into the last row (to start the next batch), `consumed` counts examples placed.
    """
    batch = empty_rows(num_rows, seq_len)
    row, col, segment, consumed, truncated = 0, 0, 0, 0, 0
    examples = iter(examples)
    while True:
        example = pending if pending is not None else next(examples, None)
        pending = None
        if example is None:
            break
        n = len(example["inputs"])
        too_long = n > seq_len
        if too_long:
            example = {k: v[:seq_len] for k, v in example.items()}
            n = seq_len
        if col + n > seq_len:
            row, col, segment = row + 1, 0, 0
            if row == num_rows:
                pending = example
                break
        # Counted when placed: a pending example is re-read (and cut again) by the next batch.
        truncated += int(too_long)
        segment += 1
        batch["tokens"][row, col:col + n] = example["inputs"]
        batch["targets"][row, col:col + n] = example["targets"]
        batch["loss_mask"][row, col:col + n] = example["loss_mask"]
        batch["segment_ids"][row, col:col + n] = segment
        batch["positions"][row, col:col + n] = np.arange(n)
        col += n
        consumed += 1
    return batch, pending, consumed, truncated


class SFTBatches:
    """Packed SFT batches from a task, deterministic in (task, tokenizer, cfg) and resumable.

    `get_state()` -> {"next_example": n, "truncated": k} (JSON-able); `set_state` continues
    from there (k counts examples cut to `seq_len` so far, a metric).
    """

    def __init__(self, task, tokenizer, cfg: SFTConfig):
        self.task, self.tokenizer, self.cfg = task, tokenizer, cfg
        self._next = 0   # position of the next unconsumed example in the stream
        self._permutations: dict[int, np.ndarray] = {}
        self.truncated = 0

    def _task_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.cfg.num_examples)
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng(
                [self.cfg.seed, epoch]).permutation(self.cfg.num_examples)}
        return int(self._permutations[epoch][offset])

    def example(self, position: int) -> dict[str, np.ndarray]:
        record = self.task.sample(self._task_index(position), self.cfg.seed)
        return record_example(record, self.tokenizer, self.cfg.thinking)

    def __iter__(self) -> "SFTBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        stream = (self.example(p) for p in _count_from(self._next))
        batch, _, consumed, truncated = pack_next_fit(stream, self.cfg.batch_size,
                                                      self.cfg.seq_len)
        # The example that did not fit is re-read next time: the state stays one integer.
        self._next += consumed
        self.truncated += truncated
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_example": self._next, "truncated": self.truncated}

    def set_state(self, state: Mapping[str, int]) -> None:
        self._next = int(state["next_example"])
        self.truncated = int(state["truncated"])


def _count_from(start: int) -> Iterator[int]:
    while True:
        yield start
        start += 1


# ----------------------------------------------------------------------------- step


def token_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                        loss_mask_BT: jax.Array) -> dict[str, jax.Array]:
    """Sums over masked tokens (sum/denominator pairs, so micro-batches add up exactly):
    'nll_sum', 'num_tokens', 'num_correct' (greedy argmax == target)."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    mask_BT = loss_mask_BT.astype(jnp.float32)
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
    return {"nll_sum": -jnp.sum(logp_BT * mask_BT), "num_tokens": jnp.sum(mask_BT),
            "num_correct": jnp.sum(correct_BT * mask_BT)}


def init_sft_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                   seq_len: int) -> SFTState:
    """Fresh state: model variables initialised on a [1, seq_len] dummy batch."""
    # Jitted: an eager init runs op by op (tens of seconds for a small MoE on CPU).
    variables = jax.jit(model.init)(rng, jnp.zeros((1, seq_len), jnp.int32))
    params = variables["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "router": variables.get("router", {})}


def make_sft_train_step(model, tx: optax.GradientTransformation, cfg: SFTConfig,
                        optim_cfg: optim.OptimConfig | None = None
                        ) -> Callable[[SFTState, Mapping[str, jax.Array]],
                                      tuple[SFTState, dict[str, jax.Array]]]:
    """A pure `sft_train_step(state, batch) -> (state, metrics)` (jit it; donate the state).

    batch: packed rows from `SFTBatches` ('tokens', 'targets', 'loss_mask', 'segment_ids',
    'positions', all int32 [B, T]). Loss: mean NLL over response tokens of the batch, plus the
    configured router losses.
    """

    def loss_fn(params, router, batch):
        logits_BTV, aux = model.apply({"params": params, "router": router}, batch["tokens"],
                                      positions_BT=batch["positions"],
                                      segment_ids_BT=batch["segment_ids"])
        sums = token_cross_entropy(logits_BTV, batch["targets"], batch["loss_mask"])
        nll = sums["nll_sum"] / jnp.maximum(sums["num_tokens"], 1.0)
        loss = (nll + cfg.z_loss_coef * aux["moe/z_loss"]
                + cfg.seq_aux_loss_coef * aux["moe/seq_aux_loss"])
        return loss, (sums, aux)

    def sft_train_step(state: SFTState, batch):
        (loss, (sums, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["router"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        router = router_bias.update_router_bias(state["router"], aux["moe/load"],
                                                cfg.router_bias_rate)
        num_tokens = jnp.maximum(sums["num_tokens"], 1.0)
        metrics = {"sft/loss": loss, "sft/nll": sums["nll_sum"] / num_tokens,
                   "sft/token_accuracy": sums["num_correct"] / num_tokens,
                   "sft/num_tokens": sums["num_tokens"],
                   "sft/fill": jnp.mean((batch["segment_ids"] > 0).astype(jnp.float32)),
                   "train/grad_norm": optax.global_norm(grads),
                   "train/skipped_steps": optim.skipped_steps(opt_state),
                   "train/params_finite": integrity.all_finite(params).astype(jnp.float32),
                   "moe/z_loss": aux["moe/z_loss"], "moe/dropped_frac": aux["moe/dropped_frac"]}
        if optim_cfg is not None:
            metrics["train/lr"] = optim.current_learning_rate(optim_cfg, state["opt_state"])
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                     "router": router}
        return new_state, metrics

    return sft_train_step


# ----------------------------------------------------------------------------- stage


def train_sft(model, task, tokenizer, directory: str | os.PathLike, cfg: SFTConfig,
              optim_cfg: optim.OptimConfig,
              ckpt_cfg: checkpoint_lib.CheckpointConfig = checkpoint_lib.CheckpointConfig(),
              *, rng: jax.Array | None = None, is_main: bool | None = None,
              initial_policy: Callable[[dict], dict] | None = None,
              stop: preemption.StopOnSignal | None = None) -> SFTState:
    """Runs (or resumes) the SFT stage in `directory`; returns the final state.

    directory gets checkpoints/ (state + data position), metrics.jsonl, tensorboard/. A
    directory holding a checkpoint resumes from its newest intact step (`Checkpointer.restore`
    falls back past damaged ones); one at `cfg.num_steps` returns at once.
    Initialise RL from it with `load_policy(directory, target)`. `initial_policy` maps the
    freshly initialised {"params", "router"} to the ones a new stage starts from (the
    experiment's ``init_from``); the optimizer state is initialised from those.

    stop: when it reports a stop signal, the stage saves the step just finished and raises
    `preemption.Preempted`. A loss or parameters non-finite for
    `ckpt_cfg.max_nonfinite_steps` steps in a row raise `health.NonFiniteError` before saving.

    Runs on the default device of one process (the model is tiny/small for this stage); a
    sharded SFT would jit `make_sft_train_step` with shardings, as the RL loop does.
    """
    tx = optim.make_optimizer(optim_cfg)
    rng = jax.random.key(cfg.seed) if rng is None else rng
    data = SFTBatches(task, tokenizer, cfg)
    start = 0
    with checkpoint_lib.Checkpointer(os.path.join(directory, "checkpoints"), ckpt_cfg) as ckpt:
        if ckpt.latest_step() is None:
            state = init_sft_state(model, tx, rng, cfg.seq_len)
            if initial_policy is not None:
                policy = initial_policy({"params": state["params"], "router": state["router"]})
                state = {**state, **policy, "opt_state": tx.init(policy["params"])}
        else:
            # Shapes only: a resumed (or finished) stage never pays for the model's init.
            target = jax.eval_shape(lambda: init_sft_state(model, tx, rng, cfg.seq_len))
            restored = ckpt.restore(target)
            state, start = restored.state, restored.step
            data.set_state(restored.meta["data"])
        writer = metrics_lib.MetricsWriter(
            directory, resume_step=start if start else None, total_steps=cfg.num_steps,
            console_every=cfg.log_every, is_main=is_main,
            console_fields={"loss": "sft/loss", "tok acc": "sft/token_accuracy",
                            "tok/s": "perf/tokens_per_s"})
        step_fn = jax.jit(make_sft_train_step(model, tx, cfg, optim_cfg), donate_argnums=0)
        guard = health.NonFiniteGuard(ckpt_cfg.max_nonfinite_steps, "sft")
        with writer:
            for step in range(start + 1, cfg.num_steps + 1):
                t0 = time.perf_counter()
                batch = next(data)
                state, metrics = step_fn(state, batch)
                metrics = jax.device_get(metrics)
                seconds = time.perf_counter() - t0
                metrics["perf/step_s"] = seconds
                metrics["perf/tokens_per_s"] = float(
                    (batch["segment_ids"] > 0).sum()) / seconds
                metrics["sft/truncated_examples"] = data.truncated
                # Metrics of a step are written before its checkpoint (see metrics.py).
                writer.write(step, metrics)
                guard.check(step, metrics["sft/loss"], metrics["train/params_finite"])  # raises before saving
                preempted = stop is not None and stop.should_stop()
                if ckpt.due(step) or step == cfg.num_steps or preempted:
                    ckpt.save(step, state=state, meta={"data": data.get_state(), "stage": "sft"})
                if preempted:
                    stop.exit(step, ckpt)
    return state


def load_policy(directory: str | os.PathLike, target: Mapping[str, Any],
                step: int | None = None) -> dict:
    """{"params", "router"} of an SFT run in `directory` (newest intact step by default),
    placed like `target` (arrays or ShapeDtypeStructs with shardings: any mesh). Reads only: a
    directory without checkpoints/ is an error, not a new empty checkpoint directory; damaged
    steps are skipped with a warning, never moved (the directory may be another run's)."""
    if not os.path.isdir(os.path.join(directory, "checkpoints")):
        raise FileNotFoundError(f"no SFT/RL checkpoints in {directory} (checkpoints/ missing)")
    with checkpoint_lib.Checkpointer(os.path.join(directory, "checkpoints")) as ckpt:
        restored = ckpt.restore({"params": target["params"], "router": target["router"]},
                                step, partial=True, read_only=True)
    return restored.state

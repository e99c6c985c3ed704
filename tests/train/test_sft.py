"""SFT stage: example construction, next-fit packing, resumable data, loss, packed == separate."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ring_jax.config import ConfigError
from ring_jax.data import tasks
from ring_jax.data.tokenizer import get_tokenizer
from ring_jax.model import Transformer, presets
from ring_jax.train import checkpoint, optim, sft
from ring_jax.train import metrics as metrics_lib


def _ex(n, start=1, prompt_len=1):
    ids = list(range(start, start + n + 1))
    return sft.make_example(ids[:prompt_len], ids[prompt_len:])


def test_make_example_masks_prompt_targets():
    ex = sft.make_example([1, 2, 3], [4, 5, 9])
    np.testing.assert_array_equal(ex["inputs"], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(ex["targets"], [2, 3, 4, 5, 9])
    # Target 3 is still prompt; the first response token (4) is predicted from the last prompt
    # token. An off-by-one here would train on predicting the prompt or skip the first answer.
    np.testing.assert_array_equal(ex["loss_mask"], [0, 0, 1, 1, 1])


def test_record_example_uses_chat_template_and_eos():
    tok = get_tokenizer("byte")
    record = tasks.get("addition").sample(0, 0)
    ex = sft.record_example(record, tok, thinking=True)
    prompt = tok.encode(tok.apply_chat_template(record.prompt, thinking=True))
    response = tok.encode(record.solution_text(True)) + [tok.eos_id]
    assert int(ex["loss_mask"].sum()) == len(response)
    assert ex["targets"][-1] == tok.eos_id
    np.testing.assert_array_equal(ex["inputs"][:len(prompt)], prompt)


def test_pack_next_fit_hand_case():
    examples = [_ex(3, 10), _ex(4, 20), _ex(2, 30), _ex(5, 40), _ex(2, 50)]
    batch, pending, consumed, truncated = sft.pack_next_fit(examples, num_rows=2, seq_len=8)
    # row 0: 3 + 4 = 7 tokens; the 2-token example does not fit (next-fit) -> row 1: 2 + 5.
    np.testing.assert_array_equal(batch["segment_ids"],
                                  [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 2, 2, 2, 2, 2, 0]])
    np.testing.assert_array_equal(batch["positions"],
                                  [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 0]])
    np.testing.assert_array_equal(batch["tokens"][1, :2], [30, 31])
    np.testing.assert_array_equal(batch["targets"][1, :2], [31, 32])
    assert consumed == 4 and truncated == 0
    np.testing.assert_array_equal(pending["inputs"], [50, 51])
    assert batch["loss_mask"][0, 7] == 0 and batch["tokens"][0, 7] == 0


def test_pack_truncates_long_examples():
    batch, pending, consumed, truncated = sft.pack_next_fit([_ex(12)], num_rows=1, seq_len=8)
    assert truncated == 1 and consumed == 1 and pending is None
    np.testing.assert_array_equal(batch["positions"][0], np.arange(8))


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("byte")


def test_batches_deterministic_and_resumable(tok):
    cfg = sft.SFTConfig(seq_len=64, batch_size=2, num_examples=7, seed=3)
    task = tasks.get("addition")
    first = sft.SFTBatches(task, tok, cfg)
    batches = [next(first) for _ in range(6)]   # crosses epochs (7 examples per epoch)
    again = sft.SFTBatches(task, tok, cfg)
    for want in batches[:2]:
        got = next(again)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    resumed = sft.SFTBatches(task, tok, cfg)
    probe = sft.SFTBatches(task, tok, cfg)
    next(probe)
    next(probe)
    resumed.set_state(probe.get_state())
    for want in batches[2:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # Every example of epoch 0 appears once: indices are a permutation.
    assert sorted(probe._task_index(p) for p in range(7)) == list(range(7))


def test_token_cross_entropy_hand_values():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    sums = sft.token_cross_entropy(logits, jnp.array([[0, 2]]), jnp.array([[1, 1]]))
    assert float(sums["nll_sum"]) == pytest.approx(-np.log(0.5) - np.log(0.1), rel=1e-5)
    assert float(sums["num_correct"]) == 1.0 and float(sums["num_tokens"]) == 2.0
    masked = sft.token_cross_entropy(logits, jnp.array([[0, 2]]), jnp.array([[0, 1]]))
    assert float(masked["nll_sum"]) == pytest.approx(-np.log(0.1), rel=1e-5)


_CFG = sft.SFTConfig(seq_len=64, batch_size=2, router_bias_rate=0.01)
_OPTIM = optim.OptimConfig(learning_rate=3e-3, warmup_steps=0)


@pytest.fixture(scope="module")
def tiny():
    """One initialised tiny model for the whole module (init compiles for seconds)."""
    # Reference MoE dispatch: no capacity drops, so packing cannot change which tokens are kept.
    model = Transformer(presets.get("tiny", moe_impl="reference"))
    tx = optim.make_optimizer(_OPTIM)
    state = sft.init_sft_state(model, tx, jax.random.key(0), _CFG.seq_len)
    return model, tx, state


def test_packed_row_equals_examples_run_separately(tiny, tok):
    model, _, state = tiny
    variables = {"params": state["params"], "router": state["router"]}
    task = tasks.get("addition")
    examples = [sft.record_example(task.sample(i, 0), tok) for i in range(3)]
    packed, _, consumed, _ = sft.pack_next_fit(examples, num_rows=1, seq_len=96)
    assert consumed == 3

    @jax.jit
    def nll_sum(batch):
        logits, _ = model.apply(variables, batch["tokens"], positions_BT=batch["positions"],
                                segment_ids_BT=batch["segment_ids"])
        return sft.token_cross_entropy(logits, batch["targets"], batch["loss_mask"])["nll_sum"]

    separate = 0.0
    for ex in examples:
        single, _, _, _ = sft.pack_next_fit([ex], num_rows=1, seq_len=96)
        separate += float(nll_sum(single))
    # A leak across segments (mask or positions not reset) changes the packed value.
    assert float(nll_sum(packed)) == pytest.approx(separate, rel=1e-5)


def test_train_step_learns_a_fixed_batch_and_updates_router_bias(tiny, tok):
    model, tx, state = tiny
    assert int(state["step"]) == 0
    batch = next(sft.SFTBatches(tasks.get("addition"), tok, _CFG))
    step = jax.jit(sft.make_sft_train_step(model, tx, _CFG, _OPTIM))
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["sft/loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(state["step"]) == 8 and int(metrics["train/skipped_steps"]) == 0
    bias = jax.tree.leaves(state["router"])[0]
    assert float(jnp.abs(bias).sum()) > 0   # the aux-loss-free bias moved
    assert float(metrics["train/lr"]) == pytest.approx(3e-3)
    assert 0 < float(metrics["sft/fill"]) <= 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_len=1), "seq_len=1 is invalid: must be >= 2"),
    (dict(batch_size=0), "batch_size=0 is invalid: must be >= 1"),
    (dict(num_steps=-1), "num_steps=-1 is invalid: must be >= 0"),
    (dict(num_examples=0), "num_examples=0 is invalid: must be >= 1"),
    (dict(thinking="yes"), "thinking='yes' is invalid: must be a bool"),
    (dict(router_bias_rate=-1.0), "router_bias_rate=-1.0 is invalid: must be >= 0.0"),
    (dict(log_every=0), "log_every=0 is invalid: must be >= 1"),
])
def test_invalid_configs(kwargs, message):
    with pytest.raises(ConfigError) as err:
        sft.SFTConfig(**kwargs)
    assert str(err.value) == message


@pytest.mark.slow
def test_train_sft_resume_equals_uninterrupted(tmp_path, tok):
    """Stop after 2 steps, restart to 4: metrics equal a straight 4-step run, exactly (CPU)."""
    model = Transformer(presets.get("tiny"))
    task = tasks.get("addition")
    cfg = dataclasses.replace(_CFG, num_steps=4, log_every=1)
    ckpt_cfg = checkpoint.CheckpointConfig(save_every=2)
    straight = sft.train_sft(model, task, tok, tmp_path / "a", cfg, _OPTIM, ckpt_cfg)
    sft.train_sft(model, task, tok, tmp_path / "b", dataclasses.replace(cfg, num_steps=2),
                  _OPTIM, ckpt_cfg)
    resumed = sft.train_sft(model, task, tok, tmp_path / "b", cfg, _OPTIM, ckpt_cfg)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    strip = lambda records: [{k: v for k, v in r.items()
                              if not k.startswith(("perf/", "time/"))} for r in records]
    rec_a = strip(metrics_lib.read_jsonl(tmp_path / "a" / "metrics.jsonl"))
    rec_b = strip(metrics_lib.read_jsonl(tmp_path / "b" / "metrics.jsonl"))
    assert [r["step"] for r in rec_b] == [1, 2, 3, 4]
    assert rec_a == rec_b
    # Warm-starting RL: params + router of the SFT run, restored alone.
    policy = sft.load_policy(tmp_path / "b", {"params": straight["params"],
                                              "router": straight["router"]})
    for a, b in zip(jax.tree.leaves(policy["params"]), jax.tree.leaves(straight["params"])):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=0, max_size=20), st.integers(1, 4),
       st.integers(2, 16))
def test_pack_next_fit_properties(lengths, num_rows, seq_len):
    examples = [_ex(n, start=100 * i, prompt_len=1) for i, n in enumerate(lengths)]
    batch, pending, consumed, truncated = sft.pack_next_fit(examples, num_rows, seq_len)
    # Examples are placed whole (or cut to seq_len), in order, each once; then one is pending.
    assert consumed + (pending is not None) <= len(examples)
    assert truncated == sum(n > seq_len for n in lengths[:consumed])
    placed = []
    for row in range(num_rows):
        seg_T, pos_T = batch["segment_ids"][row], batch["positions"][row]
        used = int((seg_T > 0).sum())
        assert np.all(seg_T[:used] > 0) and np.all(seg_T[used:] == 0)   # padding at the end
        for segment in range(1, int(seg_T.max(initial=0)) + 1):
            idx = np.flatnonzero(seg_T == segment)
            np.testing.assert_array_equal(pos_T[idx], np.arange(len(idx)))
            placed.append(batch["tokens"][row, idx])
    assert len(placed) == consumed
    for tokens, ex in zip(placed, examples):
        np.testing.assert_array_equal(tokens, ex["inputs"][:seq_len])
    if pending is not None:
        np.testing.assert_array_equal(pending["inputs"], examples[consumed]["inputs"][:seq_len])


@pytest.mark.slow
def test_train_sft_falls_back_past_a_damaged_checkpoint(tmp_path, tok, caplog):
    """The SFT stage's newest checkpoint is corrupted (flipped bytes that still load): the
    rerun warns, restores the step before, redoes the lost step and ends bit-identical."""
    import os
    model = Transformer(presets.get("tiny"))
    task = tasks.get("addition")
    cfg = dataclasses.replace(_CFG, num_steps=2, batch_size=1, seq_len=32)
    ckpt_cfg = checkpoint.CheckpointConfig(save_every=1, async_save=False)
    first = sft.train_sft(model, task, tok, tmp_path, cfg, _OPTIM, ckpt_cfg)
    step_dir = tmp_path / "checkpoints" / "2" / "state"
    path = max((os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs),
               key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2:len(data) // 2 + 400] = bytes(400)
    open(path, "wb").write(bytes(data))
    with caplog.at_level("WARNING", logger=checkpoint.__name__):
        again = sft.train_sft(model, task, tok, tmp_path, cfg, _OPTIM, ckpt_cfg)
    assert any(f"{tmp_path / 'checkpoints' / '2'} is damaged" in r.getMessage()
               for r in caplog.records)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_train_sft_stops_on_a_nonfinite_streak_before_saving(tmp_path, tok):
    """Resuming poisoned (NaN) parameters: steps 2 and 3 have a NaN loss; with
    max_nonfinite_steps=2 the stage stops at step 3 with an error, before saving it."""
    model = Transformer(presets.get("tiny"))
    task = tasks.get("addition")
    cfg = dataclasses.replace(_CFG, num_steps=5, batch_size=1, seq_len=32)
    ckpt_cfg = checkpoint.CheckpointConfig(save_every=1, async_save=False, max_nonfinite_steps=2)
    tx = optim.make_optimizer(_OPTIM)
    state = sft.init_sft_state(model, tx, jax.random.key(0), cfg.seq_len)
    state["params"] = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state["params"])
    with checkpoint.Checkpointer(tmp_path / "checkpoints", ckpt_cfg) as ckpt:
        ckpt.save(1, state=state, meta={"data": {"next_example": 0, "truncated": 0},
                                        "stage": "sft"})
    from ring_jax.train import health
    with pytest.raises(health.NonFiniteError) as err:
        sft.train_sft(model, task, tok, tmp_path, cfg, _OPTIM, ckpt_cfg)
    assert "sft step 3: non-finite loss" in str(err.value)
    assert "stopped before saving step 3" in str(err.value)
    with checkpoint.Checkpointer(tmp_path / "checkpoints", ckpt_cfg) as ckpt:
        assert ckpt.all_steps() == [1, 2]

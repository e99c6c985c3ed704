"""Reward composition: format weight, think requirement, truncation, DAPO overlong penalty."""
import concurrent.futures

import numpy as np
import pytest

from ring_jax.config import ConfigError
from ring_jax.data import tasks
from ring_jax.data.rewards import (RewardConfig, make_reward_fn, overlong_penalty,
                                   register_reward, reward_names)
from ring_jax.data.tasks.base import RewardResult
from ring_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
TASK = tasks.get("addition", min_size=2, max_size=3)
RECORD = TASK.sample(0, 0)


def tokens(text, eos=True):
    return np.asarray(TOK.encode(text) + ([TOK.eos_id] if eos else []), np.int32)


def test_task_reward_and_eos_handling():
    fn = make_reward_fn(RewardConfig(), TASK, TOK)
    reward, info = fn(RECORD, tokens(RECORD.solution_text()), "stop")
    assert reward == 1.0 and info["correct"]
    assert info["response_tokens"] == len(TOK.encode(RECORD.solution_text())) + 1  # + EOS
    # Text after EOS is ignored (engine may hand back pads/garbage after the stop token).
    after = np.concatenate([tokens(RECORD.solution_text()), tokens("999", eos=False)])
    assert fn(RECORD, after, "stop")[0] == 1.0
    assert fn(RECORD.to_dict(), tokens("</think>0"), "stop")[0] == 0.0


def test_format_weight_and_think_requirement():
    cfg = RewardConfig(format_weight=0.2, require_think_close=True)
    fn = make_reward_fn(cfg, TASK, TOK)
    wrong_but_formatted = fn(RECORD, tokens("</think>1"), "stop")[0]
    assert wrong_but_formatted == pytest.approx(0.2)
    assert fn(RECORD, tokens(RECORD.solution_text()), "stop")[0] == pytest.approx(1.0)
    # Right answer but the thinking section never closed: 0 (not 0.8 or 1.0).
    assert fn(RECORD, tokens(RECORD.answer), "stop")[0] == 0.0
    fmt = make_reward_fn(RewardConfig(name="format"), TASK, TOK)
    assert fmt(RECORD, tokens("</think>1"), "stop")[0] == 1.0
    assert fmt(RECORD, tokens("</think>"), "stop")[0] == 0.0


def test_overlong_penalty_hand_checked():
    cfg = RewardConfig(max_response_tokens=100, overlong_buffer=20, overlong_penalty=0.5)
    # Linear from 80 tokens (0) to 100 tokens (full 0.5); a bug using max instead of max-buffer
    # as the start would give 0 at 90.
    assert [overlong_penalty(cfg, n) for n in (10, 80, 90, 100, 150)] == [0, 0, 0.25, 0.5, 0.5]
    step = RewardConfig(max_response_tokens=10)
    assert [overlong_penalty(step, n) for n in (9, 10)] == [0.0, 1.0]
    fn = make_reward_fn(cfg, TASK, TOK)
    solution = tokens(RECORD.solution_text())
    long = tokens(" " * (100 - len(solution)) + RECORD.solution_text())  # 100 tokens with EOS
    reward, info = fn(RECORD, long, "stop")
    assert info["reward/length_penalty"] == pytest.approx(0.5) and reward == pytest.approx(0.5)
    # Pads (fixed-width rows) are not response length; tokens after EOS are not either.
    padded = np.concatenate([solution, np.full(100, TOK.pad_id), solution])
    reward, info = fn(RECORD, padded, "stop")
    assert info["response_tokens"] == len(solution) and reward == 1.0


def test_truncated_reward():
    fn = make_reward_fn(RewardConfig(truncated_reward=0.0), TASK, TOK)
    assert fn(RECORD, tokens(RECORD.solution_text(), eos=False), "length")[0] == 0.0
    assert fn(RECORD, tokens(RECORD.solution_text()), "stop")[0] == 1.0


def test_thread_safe_pool():
    fn = make_reward_fn(RewardConfig(format_weight=0.1), TASK, TOK)
    records = [TASK.sample(i, 0) for i in range(200)]
    responses = [tokens(r.solution_text() if i % 2 else "</think>-1")
                 for i, r in enumerate(records)]
    serial = [fn(r, t, "stop")[0] for r, t in zip(records, responses)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda rt: fn(rt[0], rt[1], "stop")[0],
                                 zip(records, responses)))
    assert threaded == serial and set(serial) == {0.1, 1.0}


def test_registry_and_validation():
    register_reward("always_half", lambda task, rec, text: RewardResult(0.5, {}))
    assert "always_half" in reward_names()
    fn = make_reward_fn(RewardConfig(name="always_half"), TASK, TOK)
    assert fn(RECORD, tokens("x"), "stop")[0] == 0.5
    with pytest.raises(ConfigError, match="name"):
        RewardConfig(name="nope")
    with pytest.raises(ConfigError, match="format_weight"):
        RewardConfig(format_weight=1.5)
    with pytest.raises(ConfigError, match="overlong_buffer"):
        RewardConfig(overlong_buffer=4)
    with pytest.raises(ConfigError, match="overlong_buffer"):
        RewardConfig(max_response_tokens=4, overlong_buffer=5)

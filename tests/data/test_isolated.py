"""Isolated scoring: a verifier that would freeze the process is killed at the deadline."""
import concurrent.futures
import time

import numpy as np
import pytest

from ring_jax.config import ConfigError
from ring_jax.data import tasks
from ring_jax.data.rewards import RewardConfig, make_reward_fn
from ring_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def tokens(text):
    return np.asarray(TOK.encode(text) + [TOK.eos_id], np.int32)


@pytest.fixture(scope="module")
def isolated_fn():
    # guard=False: without the heuristic guard, 9^{9^{9}} makes sympy compute a
    # 370-million-digit integer while holding the GIL (minutes).
    task = tasks.get("math", guard=False)
    fn = make_reward_fn(RewardConfig(score_timeout_s=20.0, score_workers=2), task, TOK)
    yield task, fn
    fn.close()


def test_isolated_matches_in_process_scores(isolated_fn):
    task, fn = isolated_fn
    local = make_reward_fn(RewardConfig(), task, TOK)
    records = [task.sample(i, 0) for i in range(6)]
    responses = [tokens(r.solution_text() if i % 2 else "</think>\\boxed{12345}")
                 for i, r in enumerate(records)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        isolated = list(pool.map(lambda rt: fn(rt[0], rt[1], "stop")[0],
                                 zip(records, responses)))
    assert isolated == [local(r, t, "stop")[0] for r, t in zip(records, responses)]
    assert isolated == [0.0, 1.0] * 3


@pytest.mark.slow
def test_hanging_verifier_is_killed_and_replaced():
    task = tasks.get("math", guard=False)
    fn = make_reward_fn(RewardConfig(score_timeout_s=8.0, score_workers=1), task, TOK)
    try:
        record = task.sample(0, 0)
        assert fn(record, tokens(record.solution_text()), "stop")[0] == 1.0  # worker warm
        start = time.monotonic()
        reward, info = fn(record, tokens("</think>\\boxed{9^{9^{9}}}"), "stop")
        assert reward == 0.0 and "timed out" in info["error"]
        assert time.monotonic() - start < 8.0 + 5.0
        # The replacement worker scores normally.
        assert fn(record, tokens(record.solution_text()), "stop")[0] == 1.0
    finally:
        fn.close()


def test_validation():
    with pytest.raises(ConfigError, match="score_timeout_s"):
        RewardConfig(score_timeout_s=0.0)
    with pytest.raises(ConfigError, match="score_workers"):
        RewardConfig(score_workers=0)

"""The engine against the naive full-recompute generator (float32: token-exact, |Δlogp| ≤ 1e-5),
through continuous-batching refills, budget cuts, pause → resume, weight loads; bad input."""
import dataclasses

import jax
import numpy as np
import pytest

from ring_jax.model import Transformer
from ring_jax.rollout import reference
from ring_jax.rollout.engine import RequestError
from ring_jax.rollout.types import FINISH_LENGTH, FINISH_STOP, Request, SamplingParams

MAX_LEN = 64  # the shared engine's (conftest)
NUM_REQUESTS = 6  # every reference run uses this batch size (one compile)


@pytest.fixture
def fresh(fp32_engine, tiny_variables):
    """The shared float32 engine (4 slots), empty and holding the base weights as version 0."""
    fp32_engine.drain()
    fp32_engine.load_weights(tiny_variables, 0)
    return fp32_engine


@pytest.fixture(scope="module")
def ref_forward(tiny_cfg):
    return reference.model_forward(Transformer(tiny_cfg), record_expert_ids=True)


@pytest.fixture(scope="module")
def other_variables(tiny_variables):
    # The next policy version: the same weights, perturbed (cheaper than a second init).
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape).astype(x.dtype),
                        tiny_variables)


def make_requests(seed, sampled=True, prefix="r"):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(NUM_REQUESTS):
        prompt = rng.integers(0, 512, size=int(rng.integers(1, 24))).astype(np.int32)
        if sampled:
            params = SamplingParams(temperature=float(rng.uniform(0.5, 1.5)),
                                    top_k=int(rng.choice([0, 20])),
                                    top_p=float(rng.choice([1.0, 0.9])),
                                    max_new_tokens=int(rng.integers(1, 30)),
                                    min_new_tokens=int(rng.integers(0, 2)),
                                    stop_token_ids=tuple(int(t) for t in rng.integers(0, 512, 6)))
        else:
            params = SamplingParams(greedy=True, max_new_tokens=int(rng.integers(1, 30)))
        out.append(Request(f"{prefix}{i}", prompt, params, seed=int(rng.integers(0, 2**32))))
    return out


def run_to_end(engine, requests, budget=None):
    engine.add(requests)
    finished = []
    while True:
        out = engine.step(budget)
        finished += out.finished
        if out.num_in_flight == 0:
            return {r.request_id: r for r in finished}


def assert_same(got, want, logprob_atol=1e-5):
    assert got.request_id == want.request_id
    np.testing.assert_array_equal(got.tokens, want.tokens, err_msg=got.request_id)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=logprob_atol, rtol=0)
    np.testing.assert_array_equal(got.versions, want.versions)
    np.testing.assert_array_equal(got.expert_ids, want.expert_ids)
    assert got.finish_reason == want.finish_reason


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_fp32_engine_equals_full_recompute(fresh, ref_forward, tiny_variables, sampled):
    requests = make_requests(0, sampled)
    want = reference.generate(ref_forward, tiny_variables, requests, max_len=MAX_LEN)
    got = run_to_end(fresh, requests)
    assert sorted(got) == sorted(r.request_id for r in requests)
    for w in want:
        assert_same(got[w.request_id], w)
    assert sum(r.num_generated for r in want) > 40  # refills happened: 6 requests, 4 slots
    if sampled:
        assert {r.finish_reason for r in want} == {FINISH_STOP, FINISH_LENGTH}


def test_pause_resume_and_version_bumps_equal_an_uninterrupted_run(fresh, ref_forward,
                                                                    tiny_variables):
    requests = make_requests(1)
    want = reference.generate(ref_forward, tiny_variables, requests, max_len=MAX_LEN)
    fresh.add(requests)
    finished, cuts = [], 0
    while True:
        out = fresh.step(token_budget=7)
        finished += out.finished
        partial = fresh.drain()
        if not partial:
            break
        cuts += 1
        # Same weights under a new version: tokens identical, versions record the cut.
        fresh.load_weights(tiny_variables, fresh.version + 1)
        fresh.add(partial)
    got = {r.request_id: r for r in finished}
    assert cuts > 3
    for w in want:
        g = got[w.request_id]
        assert_same(g, dataclasses.replace(w, versions=g.versions))
        assert (np.diff(g.versions) >= 0).all()
    assert max(r.versions.max() for r in got.values()) > 0


def test_outputs_do_not_depend_on_slot_or_batch_composition(fresh):
    requests = make_requests(2)
    alone = run_to_end(fresh, requests)
    others = make_requests(3, prefix="x")
    mixed = run_to_end(fresh, [others[0], requests[4], others[1], requests[1], others[2],
                               requests[0], requests[3], requests[2], requests[5]])
    # Tokens are identical; log-probs agree to float rounding (a different prefill bucket or
    # expert grouping changes the accumulation order, not the math).
    for rid, r in alone.items():
        assert_same(mixed[rid], r, logprob_atol=2e-6)


def test_overflowing_expert_takes_the_all_tokens_branch_and_stays_exact(fresh, ref_forward,
                                                                          tiny_variables):
    """A router bias that sends every token to experts 0 and 1 overflows the smallest capacity
    of the engine's `dropless_capacity` dispatch at every prefill and decode step, so each one
    runs the C = all-tokens fallback; the output still equals the reference token for token
    (a capacity-limited dispatch would zero the overflowing tokens' expert outputs)."""
    overloaded = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[..., :2].add(10.0) if "expert_bias" in jax.tree_util.keystr(path)
        else x, tiny_variables)
    requests = make_requests(6)
    want = reference.generate(ref_forward, overloaded, requests, max_len=MAX_LEN)
    fresh.load_weights(overloaded, 0)
    got = run_to_end(fresh, requests)
    for w in want:
        assert_same(got[w.request_id], w)
        assert (np.sort(w.expert_ids, axis=-1) == [0, 1]).all(), (w.request_id, w.expert_ids)


def test_token_budget_is_respected_and_nothing_is_lost(fresh):
    requests = make_requests(4, sampled=False)
    fresh.add(requests)
    out = fresh.step(token_budget=10)
    assert 10 <= out.num_new_tokens < 10 + fresh.num_slots
    drained = fresh.drain()
    assert out.num_in_flight == len(drained)
    ids = [r.request_id for r in out.finished + drained]
    assert sorted(ids) == sorted(r.request_id for r in requests)
    assert sum(r.num_generated for r in out.finished + drained) == out.num_new_tokens
    assert all(not r.finished for r in drained)


def test_load_weights_reprefills_in_flight_requests(fresh, ref_forward, tiny_variables,
                                                     other_variables):
    requests = make_requests(5)
    fresh.add(requests)
    first = fresh.step(token_budget=12)
    partial = fresh.drain()  # what was in flight at the cut
    assert partial
    fresh.add(requests)  # same again: deterministic, so the same cut
    again = fresh.step(token_budget=12)
    assert [r.request_id for r in again.finished] == [r.request_id for r in first.finished]
    fresh.load_weights(other_variables, 1)
    got = run_to_end(fresh, [])
    want = reference.generate(ref_forward, other_variables, partial + make_requests(9)[:6 - len(
        partial)], max_len=MAX_LEN, version=1)
    assert any(p.num_generated for p in partial)
    for w, p in zip(want, partial):
        assert_same(got[w.request_id], w)  # old tokens kept, continued under the new weights
        np.testing.assert_array_equal(got[w.request_id].versions[:p.num_generated], 0)
        np.testing.assert_array_equal(got[w.request_id].versions[p.num_generated:], 1)


def test_stats_count_prefill_and_decode_work(fresh):
    fresh.pop_stats()
    requests = make_requests(6, sampled=False)
    got = run_to_end(fresh, requests)
    stats = fresh.pop_stats()
    assert fresh.pop_stats() == {}
    # Every request is prefilled once (sampling its first token), then decoded.
    assert stats["prefill_tokens"] == sum(len(r.prompt_tokens) for r in requests)
    assert stats["prefill_resumed_tokens"] == 0
    assert stats["prefill_padded_tokens"] >= stats["prefill_tokens"]
    assert sum(r.num_generated for r in got.values()) == len(requests) + stats["decode_tokens"]
    assert 0 < stats["decode_tokens"] <= stats["decode_steps"] * fresh.num_slots
    assert stats["decode_calls"] >= 1 and stats["prefill_calls"] >= 2  # 6 requests, 4 slots
    assert stats["prefill_s"] > 0 and stats["decode_s"] > 0
    # A resumed request re-prefills its prompt and the tokens it already has.
    fresh.add(make_requests(7, sampled=False))
    fresh.step(token_budget=12)
    partial = [r for r in fresh.drain() if r.num_generated]
    fresh.pop_stats()
    fresh.add(partial)
    run_to_end(fresh, [])
    stats = fresh.pop_stats()
    assert stats["prefill_resumed_tokens"] == sum(r.num_generated for r in partial) > 0
    assert stats["prefill_tokens"] == sum(len(r.prompt_tokens) + r.num_generated
                                          for r in partial)


def test_sequences_stop_at_max_len(fresh):
    prompt = np.arange(MAX_LEN - 3, dtype=np.int32)
    r = Request("long", prompt, SamplingParams(greedy=True, max_new_tokens=100))
    got = run_to_end(fresh, [r])["long"]
    assert got.num_generated == 3 and got.finish_reason == FINISH_LENGTH


def test_min_new_tokens_suppresses_stop_tokens(fresh):
    prompt = np.arange(5, dtype=np.int32)
    free = run_to_end(fresh, [Request("a", prompt, SamplingParams(greedy=True,
                                                                  max_new_tokens=12))])["a"]
    stop = int(free.tokens[0])
    stopped = run_to_end(fresh, [Request("b", prompt, SamplingParams(
        greedy=True, max_new_tokens=12, stop_token_ids=(stop,)))])["b"]
    assert stopped.finish_reason == FINISH_STOP and stopped.num_generated == 1
    delayed = run_to_end(fresh, [Request("c", prompt, SamplingParams(
        greedy=True, max_new_tokens=12, min_new_tokens=3, stop_token_ids=(stop,)))])["c"]
    assert stop not in delayed.tokens[:3].tolist()
    if delayed.finish_reason == FINISH_STOP:
        assert delayed.tokens[-1] == stop and delayed.num_generated > 3


@pytest.mark.parametrize("bad, message", [
    (dict(prompt_tokens=np.zeros((0,), np.int32)), "non-empty"),
    (dict(prompt_tokens=np.zeros((MAX_LEN,), np.int32)), "no room"),
    (dict(prompt_tokens=np.array([1, 512], np.int32)), r"\[0, 512\)"),
    (dict(prompt_tokens=np.array([-1], np.int32)), r"\[0, 512\)"),
    (dict(finish_reason=FINISH_STOP), "already finished"),
    (dict(seed=2**32), "seed"),
    (dict(request_id="ok"), "already in the engine"),
], ids=["empty", "too-long", "id>=vocab", "negative-id", "finished", "seed", "duplicate"])
def test_bad_requests_are_rejected_and_nothing_is_queued(fresh, bad, message):
    ok = Request("ok", np.array([1, 2, 3], np.int32))
    bad_request = dataclasses.replace(Request("bad", np.array([4], np.int32)), **bad)
    with pytest.raises(RequestError, match=message):
        fresh.add([ok, bad_request])
    assert fresh.drain() == []


@pytest.mark.parametrize("budget", [0, -3, 2.5, True])
def test_bad_budget_is_rejected_and_requests_stay(fresh, budget):
    fresh.add([Request("keep", np.array([1, 2], np.int32))])
    with pytest.raises(ValueError, match="token_budget"):
        fresh.step(budget)
    assert [r.request_id for r in fresh.drain()] == ["keep"]

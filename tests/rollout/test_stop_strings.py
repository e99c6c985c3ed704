"""Stop strings: the cut rule by hand, the engine's cut of a greedy response, engine == naive
reference through continuous-batching refills and budget cuts, min_new_tokens, bad input."""
import numpy as np
import pytest

from ring_jax.config import ConfigError
from ring_jax.model import Transformer
from ring_jax.rollout import reference
from ring_jax.rollout.engine import RequestError
from ring_jax.rollout.types import (FINISH_LENGTH, FINISH_STOP, Request, SamplingParams,
                                    stop_string_cut)

MAX_LEN = 64  # the shared engine's (conftest)


def letters(ids):
    """A deterministic detokenizer: one letter per token, id -> chr(ord('a') + id % 26)."""
    return "".join(chr(ord("a") + int(i) % 26) for i in ids)


@pytest.fixture
def engine(fp32_engine, tiny_variables, monkeypatch):
    """The shared float32 engine (4 slots, decode_chunk 4), empty, with the letters detokenizer
    (set on the compiled engine rather than building a second one)."""
    fp32_engine.drain()
    fp32_engine.load_weights(tiny_variables, 0)
    monkeypatch.setattr(fp32_engine, "_detokenize", letters)
    return fp32_engine


@pytest.fixture(scope="module")
def ref_forward(tiny_cfg):
    return reference.model_forward(Transformer(tiny_cfg), record_expert_ids=True)


def run_to_end(engine, requests, budget=None):
    engine.add(requests)
    finished, spent = [], 0
    while True:
        out = engine.step(budget)
        finished += out.finished
        spent += out.num_new_tokens
        if out.num_in_flight == 0:
            got = {r.request_id: r for r in finished}
            # Discarded tokens past a stop string are not counted.
            assert spent == sum(r.num_generated for r in got.values())
            return got


def test_cut_rule_by_hand():
    words = {0: "ab", 1: "c", 2: "d", 3: "ab"}
    detok = lambda ids: "".join(words[i] for i in ids)  # noqa: E731
    tokens = np.array([0, 1, 2, 3, 1], np.int32)  # "ab|c|d|ab|c"

    def cut(stops, min_new=0, checked=0):
        return stop_string_cut(tokens, SamplingParams(stop_strings=stops,
                                                      min_new_tokens=min_new),
                               detok, checked=checked)

    assert cut(("bc",)) == 2  # "ab" + "c": ended by token 1
    assert cut(("zz",)) is None
    assert cut(("b",)) == 1  # inside a token's text
    assert cut(("da", "cd")) == 3  # the first to end wins, whatever the order
    assert cut(("da",), checked=2) == 4  # scanning from token 2 on
    # min_new_tokens=2: "bc" lies wholly in the text of the first 2 tokens ("abc"); the next
    # "bc" ends with token 4. "cd" straddles the boundary, so token 2 (index 2 ≥ 2) ends it.
    assert cut(("bc",), min_new=2) == 5
    assert cut(("cd",), min_new=2) == 3
    assert cut(("cd",), min_new=3) is None  # token 2 may not stop (index < 3)


def test_stop_string_cuts_a_greedy_response_mid_chunk(engine):
    prompt = np.arange(7, 12, dtype=np.int32)
    free = run_to_end(engine, [Request("free", prompt, SamplingParams(
        greedy=True, max_new_tokens=20))])["free"]
    text = letters(free.tokens)
    stop = text[6:8]
    keep = text.find(stop) + len(stop)  # one letter per token
    assert keep <= 8 < free.num_generated and free.finish_reason == FINISH_LENGTH
    got = run_to_end(engine, [Request("cut", prompt, SamplingParams(
        greedy=True, max_new_tokens=20, stop_strings=("not there", stop)))])["cut"]
    assert got.finish_reason == FINISH_STOP and got.num_generated == keep
    np.testing.assert_array_equal(got.tokens, free.tokens[:keep])
    np.testing.assert_array_equal(got.logprobs, free.logprobs[:keep])
    np.testing.assert_array_equal(got.expert_ids, free.expert_ids[:keep])
    assert letters(got.tokens).endswith(stop)
    # A stop string ending at the first (prefilled) token stops there.
    first = run_to_end(engine, [Request("first", prompt, SamplingParams(
        greedy=True, max_new_tokens=20, stop_strings=(text[0],)))])["first"]
    assert first.finish_reason == FINISH_STOP and first.num_generated == 1


def test_stop_strings_before_min_new_tokens_are_ignored(engine):
    prompt = np.arange(7, 12, dtype=np.int32)
    free = run_to_end(engine, [Request("free", prompt, SamplingParams(
        greedy=True, max_new_tokens=20))])["free"]
    text = letters(free.tokens)
    stop, min_new = text[0], 2
    later = text.find(stop, min_new)  # the first occurrence from token index min_new on
    got = run_to_end(engine, [Request("late", prompt, SamplingParams(
        greedy=True, max_new_tokens=20, min_new_tokens=min_new, stop_strings=(stop,)))])["late"]
    if later < 0:
        assert got.finish_reason == FINISH_LENGTH and got.num_generated == 20
    else:
        assert got.finish_reason == FINISH_STOP and got.num_generated == later + 1
    np.testing.assert_array_equal(got.tokens, free.tokens[:got.num_generated])
    assert got.num_generated > min_new


def make_requests(seed, prefix="s"):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(6):
        prompt = rng.integers(0, 512, size=int(rng.integers(1, 24))).astype(np.int32)
        stops = tuple(letters(rng.integers(0, 26, int(n))) for n in rng.integers(1, 3, 2))
        params = SamplingParams(temperature=float(rng.uniform(0.5, 1.5)),
                                max_new_tokens=int(rng.integers(5, 30)),
                                min_new_tokens=int(rng.integers(0, 3)),
                                stop_token_ids=tuple(int(t) for t in rng.integers(0, 512, 2)),
                                stop_strings=stops)
        out.append(Request(f"{prefix}{i}", prompt, params, seed=int(rng.integers(0, 2**32))))
    return out


@pytest.mark.parametrize("budget", [None, 7], ids=["unbudgeted", "budget7"])
def test_engine_equals_reference_with_stop_strings(engine, ref_forward, tiny_variables, budget):
    requests = make_requests(0)
    want = reference.generate(ref_forward, tiny_variables, requests, max_len=MAX_LEN,
                              detokenize=letters)
    got = run_to_end(engine, requests, budget)
    stopped_by_string = 0
    for w in want:
        g = got[w.request_id]
        np.testing.assert_array_equal(g.tokens, w.tokens, err_msg=w.request_id)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(g.expert_ids, w.expert_ids)
        assert g.finish_reason == w.finish_reason
        text = letters(w.tokens)
        ended = any(text.endswith(s) for s in w.sampling.stop_strings)
        stopped_by_string += ended and w.tokens[-1] not in w.sampling.stop_token_ids
    assert stopped_by_string >= 2  # the case under test happened (and freed slots for refills)
    assert sum(r.num_generated for r in want) > 20


def test_stop_strings_need_a_detokenizer_and_nothing_is_queued(fp32_engine):
    fp32_engine.drain()
    ok = Request("ok", np.array([1, 2, 3], np.int32))
    bad = Request("bad", np.array([4], np.int32), SamplingParams(stop_strings=("x",)))
    with pytest.raises(RequestError, match="detokenize"):
        fp32_engine.add([ok, bad])
    assert fp32_engine.drain() == []


@pytest.mark.parametrize("stops", [("",), ["a"], ("a", 3)])
def test_bad_stop_strings_are_rejected(stops):
    with pytest.raises(ConfigError, match="stop_strings"):
        SamplingParams(stop_strings=stops)

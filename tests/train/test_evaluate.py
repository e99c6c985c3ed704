"""`evaluate.evaluate`: greedy pass@1 on the greedy engine, sampled metrics on the run's engine
with request seeds from the eval stream; hand-checked pass@1 / avg@k / pass@k."""
import numpy as np

from ring_jax.rollout.types import SamplingParams, StepOutput
from ring_jax.train import evaluate


class ScriptedEngine:
    """Answers each request with one token: 1 (correct) when ``correct(request)``, else 0."""

    def __init__(self, correct):
        self.correct, self.requests, self._pending = correct, [], []

    def add(self, requests):
        self.requests += requests
        self._pending += requests

    def step(self, budget):
        done = []
        for r in self._pending:
            r.append(int(self.correct(r)), 0.0, 0)
            r.finish_reason = "stop"
            done.append(r)
        self._pending = []
        return StepOutput(finished=done, num_new_tokens=len(done), num_in_flight=0)


def _reward(record, tokens, finish_reason):
    ok = bool(tokens[0] == 1)
    return float(ok), {"correct": ok}


def test_greedy_goes_to_the_greedy_engine_and_samples_to_the_run_engine():
    records = [{"prompt_id": i, "prompt_tokens": np.asarray([5, 6], np.int32)} for i in range(4)]
    # Run engine: sample j of problem i is correct when j < i; greedy engine: problems 0, 1.
    run_engine = ScriptedEngine(lambda r: int(r.request_id.rsplit("/", 1)[1]) <
                                int(r.request_id.split("/")[2]))
    greedy_engine = ScriptedEngine(lambda r: int(r.request_id.split("/")[2]) < 2)
    out = evaluate.evaluate(run_engine, records, _reward, SamplingParams(), num_samples=4,
                            seed=1000, greedy_engine=greedy_engine)
    assert {r.sampling.greedy for r in greedy_engine.requests} == {True}
    assert {r.sampling.greedy for r in run_engine.requests} == {False}
    assert out["eval/pass@1"] == 0.5  # problems 0, 1 of 4
    # Correct samples per problem: 0, 1, 2, 3 of 4 -> avg@4 = 6/16; pass@4 = 3/4.
    assert out["eval/avg@4"] == 6 / 16 and out["eval/pass@4"] == 0.75
    assert out["eval/num_problems"] == 4.0
    # Request seeds come from the eval stream's seed: seed + 7919 · problem + sample.
    assert sorted(r.seed for r in run_engine.requests)[:2] == [1000, 1001]
    # Without a greedy engine, greedy decoding goes to the run's engine.
    alone = ScriptedEngine(lambda r: True)
    evaluate.evaluate(alone, records, _reward, SamplingParams(), num_samples=1)
    assert sum(r.sampling.greedy for r in alone.requests) == 4


def test_one_sample_does_not_overwrite_the_greedy_pass_at_1():
    records = [{"prompt_id": i, "prompt_tokens": np.asarray([5, 6], np.int32)} for i in range(4)]
    # Greedy: every problem right; the one sample per problem: all wrong. Before the fix the
    # sampled "pass@1" (0.0) replaced the greedy one (1.0) when num_samples == 1.
    out = evaluate.evaluate(ScriptedEngine(lambda r: False), records, _reward, SamplingParams(),
                            num_samples=1, greedy_engine=ScriptedEngine(lambda r: True))
    assert out["eval/pass@1"] == 1.0 and out["eval/avg@1"] == 0.0

"""reasoning-gym adapter (optional [gym] extra): generators by name, their own scorers."""
import pytest
from hypothesis import given, settings, strategies as st

rg = pytest.importorskip("reasoning_gym")

from ring_jax.config import ConfigError  # noqa: E402
from ring_jax.data import tasks  # noqa: E402
from ring_jax.data.pipeline import PromptSource, prompt_dataset  # noqa: E402
from ring_jax.data.tokenizer import ByteTokenizer  # noqa: E402

DATASETS = {"chain_sum": {"min_terms": 2, "max_terms": 4}, "spell_backward": {},
            "basic_arithmetic": {}}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_gold_scores_one_wrong_scores_less(name):
    task = tasks.get(f"gym/{name}", size=20, config=DATASETS[name])
    assert task.name == f"gym/{name}"
    for i in range(10):
        record = task.sample(i, seed=4)
        assert record == task.sample(i, seed=4)
        for response in (record.solution_text(), f"</think>  {record.answer}\n",
                         f"</think>\\boxed{{{record.answer}}}"):
            result = task.score(record, response)
            assert result.reward == 1.0 and result.details["correct"], (record, response)
        wrong = task.score(record, "</think>zzzz")
        assert wrong.reward < 1.0 and not wrong.details["correct"]


def test_countdown_scorer_accepts_other_expressions():
    task = tasks.get("gym/countdown", size=5)
    record = task.sample(0, seed=1)
    assert task.score(record, f"</think>{record.answer}").reward == 1.0
    # Not a string match: a different spelling of a valid expression also scores.
    assert task.score(record, f"</think>(({record.answer}))").reward == 1.0
    assert task.score(record, "</think>1 + 1").reward < 1.0


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=80))
def test_scoring_never_raises(text):
    task = tasks.get("gym/chain_sum", size=5)
    result = task.score(task.sample(0, 0), text)
    assert 0.0 <= result.reward <= 1.0


def test_pipeline_and_validation():
    task = tasks.get("gym/chain_sum", size=8)
    ds = prompt_dataset([PromptSource(task)], ByteTokenizer(), group_size=2, seed=3)
    assert len(ds) == 16
    record = ds[5]
    assert task.score(record, f"</think>{record['answer']}").reward == 1.0
    with pytest.raises(ConfigError, match="dataset"):
        tasks.get("gym/not_a_dataset")

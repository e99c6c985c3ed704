"""Procedural tasks: worked solutions score 1, corrupted ones 0, lenient parsing, no raising."""
import pytest
from hypothesis import given, settings, strategies as st

from ring_jax.config import ConfigError
from ring_jax.data import tasks
from ring_jax.data.tasks.arithmetic import column_addition_steps
from ring_jax.data.tasks.base import extract_answer, split_thinking
from ring_jax.data.tasks.countdown import evaluate_expression

PROCEDURAL = {
    "addition": dict(min_size=1, max_size=4, num_operands=3, show_steps=True),
    "multiplication": dict(min_size=1, max_size=3),
    "arithmetic_chain": dict(min_size=1, max_size=12, size_tail=1.0),
    "countdown": dict(min_size=2, max_size=5),
    "reverse": dict(min_size=1, max_size=9),
    "sort": dict(min_size=1, max_size=9),
    "count": dict(min_size=1, max_size=15),
}


def corrupt(name, answer):
    """A wrong answer in the right format (a scorer that only checks format would pass it)."""
    if name in ("addition", "multiplication", "arithmetic_chain", "count"):
        return str(int(answer) + 1)
    if name == "countdown":
        return f"({answer})*2"
    if name == "sort":
        return answer + ", 100"
    return answer + "q"


@pytest.mark.parametrize("name", sorted(PROCEDURAL))
def test_solutions_score_one_and_corruptions_zero(name):
    task = tasks.get(name, **PROCEDURAL[name])
    for index in range(40):
        record = task.sample(index, seed=3)
        for thinking in (True, False):
            result = task.score(record, record.solution_text(thinking))
            assert result.reward == 1.0, (record, result)
            assert result.details["format_ok"] and result.details["correct"]
        bad = f"{record.thoughts}</think>{corrupt(name, record.answer)}"
        result = task.score(record, bad)
        assert result.reward == 0.0, (record, bad, result)
        assert result.details["answer_parsed"] and not result.details["correct"]


@pytest.mark.parametrize("name", sorted(PROCEDURAL))
def test_sampling_is_deterministic_and_seeded(name):
    task = tasks.get(name, **PROCEDURAL[name])
    assert task.sample(7, seed=1) == task.sample(7, seed=1)
    assert [task.sample(i, 1).prompt for i in range(20)] != [task.sample(i, 2).prompt
                                                            for i in range(20)]
    # Record survives the dict form the grain pipeline carries.
    record = task.sample(5, seed=0)
    assert task.score(record.to_dict(), record.solution_text()).reward == 1.0


@pytest.mark.parametrize("name", sorted(PROCEDURAL))
def test_whitespace_and_boxed_answers_parse(name):
    task = tasks.get(name, **PROCEDURAL[name])
    record = task.sample(11, seed=0)
    for answer in (f"  {record.answer} \n\n", f"\\boxed{{{record.answer}}}",
                   f"The answer is $\\boxed{{{record.answer}}}$.",
                   f"work...\nFinal answer: {record.answer}"):
        result = task.score(record, f"{record.thoughts}</think>{answer}")
        assert result.reward == 1.0, (answer, result)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=200),
       name=st.sampled_from(sorted(PROCEDURAL)))
def test_scoring_never_raises(text, name):
    task = tasks.get(name, **PROCEDURAL[name])
    record = task.sample(0, seed=0)
    result = task.score(record, text)
    assert 0.0 <= result.reward <= 1.0
    assert "error" not in result.details, result.details  # garbage is handled, not caught


@pytest.mark.parametrize("text", ["</think>\\boxed{", "\\boxed{}}}", "</think></think>",
                                  "9" * 5000, "((((((((1" * 50, "1" + "*9" * 200,
                                  "</think>2**99999999", "</think>[1, 2,", "\x00\ud7ff"])
def test_adversarial_strings(text):
    for name in PROCEDURAL:
        task = tasks.get(name, **PROCEDURAL[name])
        result = task.score(task.sample(0, 0), text)
        assert result.reward == 0.0 and "error" not in result.details, (name, result)


def test_hand_checked_helpers():
    assert column_addition_steps([47, 85]) == "7+5=12,4+8+1=13"
    assert column_addition_steps([5, 999]) == "5+9=14,0+9+1=10,0+9+1=10"
    assert split_thinking("<think>abc</think> 42") == ("abc", " 42", True)
    assert split_thinking("no tags") == ("", "no tags", False)
    assert extract_answer("so \\boxed{\\frac{1}{2}} and \\boxed{7}") == "7"
    assert extract_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("line one\n  12  \n\n") == "12"
    assert extract_answer("   ") is None
    assert evaluate_expression("(2*8)*(18+7)")[0] == 400


def test_countdown_accepts_any_valid_expression():
    task = tasks.get("countdown")
    record = task.sample(0, 0)
    numbers, target = record.metadata["numbers"], record.metadata["target"]
    # A different valid expression for a hand-made record: 3, 5, 7 -> 26 = 3*7+5 = 5*7-3*3? no.
    hand = record.__class__(task="countdown", index=0, seed=0, prompt="", answer="3*7+5",
                            metadata={"numbers": [3, 5, 7], "target": 26})
    assert task.score(hand, "</think>5+7*3").reward == 1.0
    assert task.score(hand, "</think>(7*3)+5 = 26").reward == 1.0
    assert task.score(hand, "</think>7*3+5+0").reward == 0.0  # 0 is not a given number
    assert task.score(hand, "</think>3*3*3-1").reward == 0.0  # 3 used more than once
    assert task.score(hand, "</think>__import__('os')").details["answer_parsed"] is False
    assert task.score(record, f"</think>{record.answer}").reward == 1.0
    assert sorted(numbers) and target > 0


def test_long_tailed_difficulty():
    task = tasks.get("arithmetic_chain", min_size=1, max_size=40, size_tail=1.5)
    lengths = sorted(len(task.sample(i, 0).solution_text()) for i in range(400))
    median, p99 = lengths[200], lengths[396]
    assert p99 > 5 * median  # a uniform size draw would give p99 ≈ 2 x median


def test_quickstart_task_is_short():
    from ring_jax.data.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    task = tasks.get("addition", min_size=2, max_size=3)
    for i in range(50):
        record = task.sample(i, 0)
        assert len(tok.encode(record.solution_text())) + 1 <= 32  # + EOS


def test_registry():
    assert {"addition", "countdown", "math", "code"} <= set(tasks.names())
    assert tasks.is_known("addition") and tasks.is_known("gym/chain_sum")
    assert not tasks.is_known("nope") and not tasks.is_known("gym/")


def test_config_validation():
    with pytest.raises(ConfigError, match="max_size"):
        tasks.get("addition", min_size=3, max_size=2)
    with pytest.raises(ConfigError, match="task"):
        tasks.get("nope")
    with pytest.raises(ConfigError, match="num_operands"):
        tasks.get("addition", num_operands=1)


# ----------------------------------------------------------------- held-out split by construction

def _training_prompts(task, num_draws: int) -> set[str]:
    """Problems the two training paths draw: the SFT stream (`SFTBatches`' index order) and
    the RL prompt stream (`pipeline.prompt_dataset`), half each, with two seeds."""
    from ring_jax.data import pipeline
    from ring_jax.data.tokenizer import ByteTokenizer
    from ring_jax.train.sft import SFTBatches, SFTConfig
    num_examples = getattr(task, "num_examples", None)
    if num_examples is not None:  # a file task: a few epochs visit every training row
        num_draws = min(num_draws, 4 * num_examples)
    num_examples = num_examples or 100_000
    sft = SFTBatches(task, ByteTokenizer(), SFTConfig(num_examples=num_examples, seed=7))
    prompts = {task.sample(sft._task_index(p), 7).prompt for p in range(num_draws // 2)}
    rl = pipeline.prompt_dataset(task, ByteTokenizer(), seed=8, num_epochs=None,
                                 num_prompts=num_examples)
    prompts |= {rl[i]["prompt_text"] for i in range(num_draws // 2)}
    return prompts


def _check_disjoint(name: str, num_draws: int):
    from ring_jax.data.tokenizer import ByteTokenizer
    from ring_jax.train import evaluate
    task = tasks.get(name, **PROCEDURAL.get(name, {}))
    eval_set = {r["prompt_text"] for r in evaluate.eval_records(task, ByteTokenizer(), 256)}
    held_out = task.held_out()
    # The whole reachable held-out split, not only the 256 evaluated problems.
    split = eval_set | {held_out.sample(i, s).prompt for s in (0, 1) for i in range(500)}
    overlap = _training_prompts(task, num_draws) & split
    assert not overlap, (name, sorted(overlap)[:5])


@pytest.mark.parametrize("name", sorted(set(tasks.names())))
def test_training_never_draws_an_evaluation_problem(name):
    # 10^4 draws per task here (a few seconds in all); 10^5 in the slow variant below. A split by
    # seed (the old `seed_offset`) fails at once: 2-digit addition has 8,100 problems.
    _check_disjoint(name, 10_000)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(tasks.names())))
def test_training_never_draws_an_evaluation_problem_over_1e5_draws(name):
    _check_disjoint(name, 100_000)


def test_split_is_a_function_of_the_problem_alone():
    from ring_jax.data.tasks.base import in_eval_split
    task = tasks.get("addition", min_size=2, max_size=2)
    held_out = task.held_out()
    assert held_out.split == "eval" and task.split == "train"
    for i in range(200):
        for record, is_eval in ((task.sample(i, 3), False), (held_out.sample(i, 3), True)):
            assert in_eval_split("addition", record.prompt, 0.1) == is_eval
    # Hand-checked share: of the 8,100 two-digit sums, the hash holds out ~10%.
    problems = [f"{a}+{b}=" for a in range(10, 100) for b in range(10, 100)]
    share = sum(in_eval_split("addition", p, 0.1) for p in problems) / len(problems)
    assert 0.09 < share < 0.11, share
    # The salt is the task's name: another task's identical prompt text is split independently.
    assert [in_eval_split("a", p, 0.5) for p in problems[:64]] != [
        in_eval_split("b", p, 0.5) for p in problems[:64]]
    # No split: "all" trains on everything and evaluates on the same problems.
    everything = tasks.get("addition", split="all")
    assert everything.held_out() is everything
    assert {everything.sample(i, 0).prompt for i in range(3000)} & {
        held_out.sample(i, 0).prompt for i in range(300)}


def test_an_empty_split_is_a_config_error_naming_eval_fraction():
    tiny_space = tasks.get("reverse", min_size=1, max_size=1, alphabet=2)  # 2 problems
    with pytest.raises(ConfigError, match=r"eval_fraction=1e-09 is invalid"):
        tasks.get("reverse", min_size=1, max_size=1, alphabet=2,
                  eval_fraction=1e-9).held_out().sample(0, 0)
    with pytest.raises(ConfigError, match="eval.num_prompts=256 is invalid"):
        from ring_jax.data.tokenizer import ByteTokenizer
        from ring_jax.train import evaluate
        evaluate.eval_records(tasks.get("addition", min_size=1, max_size=1), ByteTokenizer(), 256)
    assert tiny_space.split == "train"


def test_eval_set_is_fixed_distinct_and_independent_of_the_run():
    from ring_jax.data.tokenizer import ByteTokenizer
    from ring_jax.train import evaluate
    task = tasks.get("addition", min_size=2, max_size=2)
    records = evaluate.eval_records(task, ByteTokenizer(), 256)
    prompts = [r["prompt_text"] for r in records]
    assert len(prompts) == len(set(prompts)) == 256
    assert [r["prompt_id"] for r in records] == list(range(256))
    assert prompts == [r["prompt_text"] for r in evaluate.eval_records(task, ByteTokenizer(),
                                                                       256)]
    # A smaller set is a prefix of a larger one (sizes nest), whatever the training split says.
    assert [r["prompt_text"] for r in evaluate.eval_records(task, ByteTokenizer(), 64)] == \
        prompts[:64]


def test_gym_tasks_split_their_items_too(monkeypatch):
    """reasoning-gym items (a stand-in generator here: 40 distinct questions, shared between
    seeds as a small generator's are) follow the same hash split."""
    import sys
    import types

    from ring_jax.data.tasks import gym

    class FakeDataset(list):
        def score_answer(self, answer, entry):
            return float(answer == entry["answer"])

    def create_dataset(name, size, seed):
        return FakeDataset({"question": f"what is {(7 * i + seed) % 40}?",
                            "answer": str((7 * i + seed) % 40)} for i in range(size))

    module = types.ModuleType("reasoning_gym")
    module.create_dataset = create_dataset
    factory = types.ModuleType("reasoning_gym.factory")
    factory.DATASETS = {"fake": None}
    monkeypatch.setitem(sys.modules, "reasoning_gym", module)
    monkeypatch.setitem(sys.modules, "reasoning_gym.factory", factory)
    gym._dataset.cache_clear()
    try:
        task = tasks.get("gym/fake", size=40, eval_fraction=0.25)
        train = {task.sample(i, s).prompt for s in range(3) for i in range(200)}
        held_out = {task.held_out().sample(i, s).prompt for s in range(3) for i in range(200)}
        assert train and held_out and train.isdisjoint(held_out)
        assert len(train | held_out) == 40  # together they cover the generator's items
        record = task.held_out().sample(3, 1)
        assert task.score(record, f"</think>{record.answer}").reward == 1.0
    finally:
        gym._dataset.cache_clear()

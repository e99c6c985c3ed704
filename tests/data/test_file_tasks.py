"""Math (math-verify) and code (sandbox) tasks over the bundled samples and files written here."""
import concurrent.futures
import json

import pytest
from hypothesis import given, settings, strategies as st

from ring_jax.config import ConfigError
from ring_jax.data import tasks
from ring_jax.data.pipeline import PromptSource, prompt_dataset
from ring_jax.data.sandbox import best_isolation
from ring_jax.data.tasks.code_file import extract_code
from ring_jax.data.tasks.math_file import looks_expensive
from ring_jax.data.tokenizer import ByteTokenizer


# Where no isolation is possible a code task must opt in to limits-only explicitly.
CODE_KW = {} if best_isolation() else {"sandbox": {"isolation": "rlimits"}}


@pytest.fixture(scope="module")
def math_task():
    return tasks.get("math")


@pytest.fixture(scope="module")
def code_task():
    return tasks.get("code", **CODE_KW)


def test_math_bundled_solutions_score_one_and_corruptions_zero(math_task):
    assert math_task.num_examples >= 12
    for i in range(math_task.num_examples):
        record = math_task.sample(i, seed=0)
        assert math_task.score(record, record.solution_text()).reward == 1.0, record
        result = math_task.score(record, f"{record.thoughts}</think>\\boxed{{12345}}")
        assert result.reward == 0.0 and result.details["answer_parsed"], record


def test_math_equivalent_forms(math_task):
    record = math_task.sample(0, 0)  # 1/2 + 1/3 = 5/6
    assert record.metadata["gold"] == "\\frac{5}{6}"
    for response in ("</think>The answer is 5/6.", "</think>$\\frac{10}{12}$",
                     "</think>  \\boxed{ \\dfrac{5}{6} }  ", "</think>final answer: 5/6"):
        assert math_task.score(record, response).reward == 1.0, response
    for response in ("</think>\\boxed{0.8333}", "</think>\\boxed{5/7}", "</think>",
                     "</think>\\boxed{", "5/6</think>6/5"):
        assert math_task.score(record, response).reward == 0.0, response


@pytest.mark.parametrize("answer", ["9^{9^{9}}", "9^9^9", "2^{99999999}", "(10^{8})!",
                                    "\\binom{100000000}{50000000}", "2**2**2**2**2",
                                    "100000!", "1" * 400, "(((9)!)!)!", "9^(9)!",
                                    "\\sqrt[e^{\\exp(10!)}]{10}", "\\exp(\\exp(99))",
                                    "\\log(\\sqrt[7*999!]{2})"])
def test_math_rejects_answers_that_would_freeze_sympy(math_task, answer):
    assert looks_expensive(answer)
    result = math_task.score(math_task.sample(1, 0), f"</think>\\boxed{{{answer}}}")
    assert result.reward == 0.0 and result.details.get("rejected")


@pytest.mark.parametrize("answer", ["2^{10}", "\\frac{5}{6}", "x^2 + 1", "5!", "(-2, 3)",
                                    "e^{2}", "\\sqrt[3]{2}", "\\binom{6}{2}", "2^{99999}"])
def test_math_guard_keeps_ordinary_answers(answer):
    assert not looks_expensive(answer)


def test_math_scores_inside_worker_threads(math_task):
    # math-verify's default signal-based timeouts raise outside the main thread.
    records = [math_task.sample(i, 0) for i in range(math_task.num_examples)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: math_task.score(r, r.solution_text()), records))
    assert all(r.reward == 1.0 for r in results), [r.details for r in results]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789+-*/^!{}()\\boxed frac$ x=.")),
               max_size=60))
def test_math_never_raises(text):
    task = tasks.get("math")
    result = task.score(task.sample(2, 0), "</think>" + text)
    assert 0.0 <= result.reward <= 1.0 and "error" not in result.details, result.details


def test_local_jsonl_levels_and_pipeline(tmp_path):
    path = tmp_path / "probs.jsonl"
    rows = [{"q": f"What is {i} + {i}?", "a": str(2 * i), "level": i % 3} for i in range(9)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = tasks.get("math", path=str(path), question_key="q", answer_key="a", levels=(1,),
                     split="all")
    assert task.num_examples == 3
    assert task.sample(0, 0).prompt.startswith("What is 1 + 1?")
    assert task.score(task.sample(0, 0), "</think>\\boxed{2}").reward == 1.0
    ds = prompt_dataset([PromptSource(task)], ByteTokenizer(), group_size=2)
    assert len(ds) == 6 and {ds[i]["index"] for i in range(6)} == {0, 1, 2}
    with pytest.raises(ConfigError, match="path"):
        tasks.get("math", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="levels"):
        tasks.get("math", path=str(path), question_key="q", answer_key="a", levels=(7,))


def test_file_rows_split_into_disjoint_train_and_held_out_sets(tmp_path):
    path = tmp_path / "probs.jsonl"
    rows = [{"q": f"What is {i} + 1?", "a": str(i + 1)} for i in range(40)]
    rows += [rows[3], rows[3]]  # duplicates must not straddle the split
    path.write_text("\n".join(json.dumps(r) for r in rows))
    kw = dict(path=str(path), question_key="q", answer_key="a")
    train = tasks.get("math", eval_fraction=0.25, **kw)
    held_out = train.held_out()
    assert held_out.split == "eval" and train.split == "train"
    prompts = lambda task: [task.sample(i, 0).prompt for i in range(task.num_examples)]
    assert set(prompts(train)).isdisjoint(prompts(held_out))
    assert sorted(prompts(train) + prompts(held_out)) == sorted(
        prompts(tasks.get("math", split="all", **kw)))
    assert 9 <= held_out.num_examples <= 12  # round(0.25 · 42) = 10, plus boundary duplicates
    # Independent of the file's order.
    path.write_text("\n".join(json.dumps(r) for r in reversed(rows)))
    assert set(prompts(tasks.get("math", eval_fraction=0.25, **kw).held_out())) == set(
        prompts(held_out))
    # The bundled samples hold out at least one row; no split, no held-out rows.
    assert tasks.get("code", **CODE_KW).held_out().num_examples >= 1
    assert tasks.get("math", eval_fraction=0.0, **kw).held_out().num_examples == 42
    assert tasks.get("addition").held_out() == tasks.get("addition", split="eval")
    with pytest.raises(ConfigError, match="eval_fraction"):
        tasks.get("math", eval_fraction=1.0, **kw)
    with pytest.raises(ConfigError, match="split"):
        tasks.get("math", split="test", **kw)
    with pytest.raises(ConfigError, match="eval_fraction"):
        tasks.get("math", eval_fraction=0.0, split="eval", **kw)


def test_extract_code():
    assert extract_code("```python\na = 1\n```\ntext ```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("```\nc = 3\n```") == "c = 3\n"
    assert extract_code("no code here") is None


def test_code_bundled_solutions_pass(code_task):
    kinds = set()
    for i in range(code_task.num_examples):
        record = code_task.sample(i, 0)
        kinds.add(bool(record.metadata["fn_name"]))
        result = code_task.score(record, record.solution_text())
        assert result.reward == 1.0, (record.prompt, result.details)
        assert result.details["tests_passed"] == result.details["tests_total"]
    assert kinds == {True, False}  # both function-style and stdio-style rows are covered


def test_code_wrong_partial_and_hostile(code_task):
    add = code_task.sample(0, 0)  # add(a, b); tests (1,2)->3, (-5,5)->0, (1e12,1)->1e12+1
    assert add.metadata["fn_name"] == "add"

    def score(body, task=code_task):
        return task.score(add, f"</think>```python\n{body}\n```")

    assert score("def add(a, b):\n    return a - b").reward == 0.0
    partial = score("def add(a, b):\n    return a + b if abs(a) < 100 else 0")
    assert partial.reward == pytest.approx(2 / 3) and not partial.details["correct"]
    strict = tasks.get("code", mode="all", **CODE_KW)
    assert score("def add(a, b):\n    return a + b if abs(a) < 100 else 0", strict).reward == 0
    # Printing a forged results line with wrong values and exiting early earns nothing.
    forged = score("import sys\nprint('__RING_JAX_RESULTS__[[\"ok\", 0], [\"ok\", 1], "
                   "[\"ok\", 2]]')\nsys.exit(0)")
    assert forged.reward == 0.0
    looping = score("def add(a, b):\n    while True:\n        pass")
    assert looping.reward == 0.0 and looping.details["limits"][0] in ("cpu_time", "wall_time")
    no_code = code_task.score(add, "</think>def add(a, b): return a + b")
    assert not no_code.details["answer_parsed"] and no_code.reward == 0.0


def test_code_stdio_checks_output(code_task):
    gcd = next(code_task.sample(i, 0) for i in range(code_task.num_examples)
               if "greatest common divisor" in code_task.sample(i, 0).prompt)
    wrong = "a, b = map(int, input().split())\nprint(min(a, b))"
    result = code_task.score(gcd, f"</think>```python\n{wrong}\n```")
    assert result.details["tests_passed"] == 0 and result.reward == 0.0


def test_code_sandbox_mode_is_namespaced_when_possible(code_task):
    assert code_task.sandbox.isolation == ("auto" if best_isolation() else "rlimits")
    if best_isolation():  # the program runs as a non-root uid (200000+ or 1000)
        record = code_task.sample(0, 0)
        probe = "import os\ndef add(a, b):\n    return a + b + (os.getuid() == 0)"
        assert code_task.score(record, f"</think>```python\n{probe}\n```").reward == 1.0


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = tmp_path / "probs.parquet"
    pq.write_table(pa.table({"question": ["What is 6 * 7?"], "answer": ["42"]}), str(path))
    task = tasks.get("math", path=str(path))
    assert task.score(task.sample(0, 0), "</think>\\boxed{42}").reward == 1.0


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("`pythonde f():\nreturn1+x")), max_size=60))
def test_code_never_raises(text):
    task = tasks.get("code", **CODE_KW)
    result = task.score(task.sample(0, 0), "</think>" + text)
    assert 0.0 <= result.reward <= 1.0 and "error" not in result.details, result.details

"""Prompts too long for scheduler.max_seq_len, and SFT examples sft.seq_len would cut to nothing,
are config errors (before, the first failed after the SFT stage, the second trained nothing)."""
import importlib.util
import json
import os

import pytest

from ring_jax.config import ConfigError
from ring_jax.data import length_check, tasks
from ring_jax.data.tokenizer import get_tokenizer
from ring_jax.train import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK = get_tokenizer("byte")


def _math_file(tmp_path, question_chars: list[int]) -> str:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": "x" * n, "answer": "1"}) + "\n"
                            for n in question_chars))
    return str(path)


def _chat_len(task, index=0):
    prompt = TOK.apply_chat_template(task.sample(index, 0).prompt, thinking=True)
    return len(TOK.encode(prompt))


def test_rl_limit_is_prompt_plus_one_response_token(tmp_path):
    task = tasks.get("math", path=_math_file(tmp_path, [5, 200, 10]), eval_fraction=0.0)
    longest = _chat_len(task, 1)
    kw = dict(seeds=(0,), thinking=True)
    # Exactly one token of room is enough; zero is not (an off-by-one here would pass it).
    length_check.check_task_lengths(task, TOK, max_seq_len=longest + 1, **kw)
    with pytest.raises(ConfigError) as err:
        length_check.check_task_lengths(task, TOK, max_seq_len=longest, **kw)
    assert str(err.value) == (
        f"scheduler.max_seq_len={longest} is invalid: 1 of 3 scanned prompts leave no room for "
        f"a response: the longest (train index 1) has {longest} tokens; raise "
        "scheduler.max_seq_len and engine.max_len above it, or use shorter problems")


def test_held_out_rows_are_scanned_too(tmp_path):
    """Evaluation runs the held-out rows through the same engine: a long one must be found
    even though training never samples it."""
    for filler in range(50):  # the split is by content hash: find contents where it is held out
        path = tmp_path / f"q{filler}.jsonl"
        rows = [{"question": f"{filler} {i}", "answer": "1"} for i in range(9)]
        rows.append({"question": "x" * 300, "answer": "1"})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        train = tasks.get("math", path=str(path), eval_fraction=0.2)
        if all(len(r["question"]) < 300 for r in train.rows):
            break
    else:
        pytest.fail("no content put the long row in the held-out split")
    with pytest.raises(ConfigError, match="the longest \\(held-out index"):
        length_check.check_task_lengths(train, TOK, seeds=(0,), thinking=True, max_seq_len=200)


def test_sft_example_cut_to_nothing(tmp_path):
    task = tasks.get("math", path=_math_file(tmp_path, [5, 120]), eval_fraction=0.0)
    prompt_len = _chat_len(task, 1)
    kw = dict(seeds=(0,), thinking=True, max_seq_len=1024)
    # seq_len == prompt length keeps the first response target; one less keeps none.
    length_check.check_task_lengths(task, TOK, sft_seq_len=prompt_len, **kw)
    with pytest.raises(ConfigError, match=f"sft.seq_len={prompt_len - 1} is invalid: 1 of 2 "
                                          "scanned SFT examples would be cut to nothing"):
        length_check.check_task_lengths(task, TOK, sft_seq_len=prompt_len - 1, **kw)
    length_check.check_task_lengths(task, TOK, sft_seq_len=0, **kw)  # no SFT: not checked


def test_sft_limit_matches_the_packer(tmp_path):
    """The boundary agrees with what sft.pack_next_fit does to an example."""
    from ring_jax.train import sft
    task = tasks.get("math", path=_math_file(tmp_path, [40]), eval_fraction=0.0)
    prompt_len = _chat_len(task)
    example = sft.record_example(task.sample(0, 0), TOK, thinking=True)
    for seq_len, learns in ((prompt_len, True), (prompt_len - 1, False)):
        batch, _, _, _ = sft.pack_next_fit([example], num_rows=1, seq_len=seq_len)
        assert bool(batch["loss_mask"].sum()) == learns


def test_experiment_config_scans_at_config_time():
    spec = importlib.util.spec_from_file_location(
        "_qs", os.path.join(ROOT, "experiments", "quickstart.py"))
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    values = quickstart.get_config("").to_dict()
    values["scheduler"]["max_seq_len"] = values["engine"]["max_len"] = 24
    with pytest.raises(ConfigError, match="scheduler.max_seq_len=24 is invalid: .* scanned "
                                          "prompts leave no room"):
        experiment.from_config_dict(values)
    values = quickstart.get_config("").to_dict()
    values["sft"]["seq_len"] = 16
    with pytest.raises(ConfigError, match="sft.seq_len=16 is invalid"):
        experiment.from_config_dict(values)


def test_every_row_of_a_file_is_scanned(tmp_path):
    """Not just the first DEFAULT_NUM_SCANNED rows: the long row is number 300."""
    task = tasks.get("math", path=_math_file(tmp_path, [5] * 299 + [200]), eval_fraction=0.0)
    with pytest.raises(ConfigError, match="1 of 300 scanned prompts"):
        length_check.check_task_lengths(task, TOK, seeds=(0, 7), thinking=True, max_seq_len=200)


def test_generated_task_scans_each_seed():
    task = tasks.get("addition", min_size=1, max_size=3)
    lengths = [n for _, n in length_check.prompt_lengths(task, TOK, (0, 1), True, 10)]
    assert len(lengths) == 20 and min(lengths) < max(lengths)  # sizes vary across problems
    with pytest.raises(ConfigError, match="of 80 scanned prompts"):
        length_check.check_task_lengths(task, TOK, seeds=(0, 1), thinking=True,
                                        max_seq_len=max(lengths), num_scanned=20)

"""Data files are validated row by row when the task is built: every error names the file, the
line and the problem (before, a malformed line reported the wrong line and no file, an empty
file said "task.levels=None is invalid", and rows missing `answer` crashed at SFT step 1)."""
import json
import re

import pytest

from ring_jax.config import ConfigError
from ring_jax.data import tasks

GOOD_MATH = {"question": "1+1?", "answer": "2"}
GOOD_CODE = {"prompt": "add", "fn_name": "add", "tests": [{"input": [1, 2], "output": 3}]}


def _write(tmp_path, lines: list, name="rows.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else
                               (x if isinstance(x, str) else json.dumps(x)).encode()) + b"\n"
                              for x in lines))
    return str(path)


def _error(task_name, path, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        tasks.get(task_name, path=path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and path in message, message
    return message


@pytest.mark.parametrize("lines,expected", [
    # Blank line 2 is counted: the old reader numbered non-blank lines only.
    ([GOOD_MATH, "", '{"question": "x", "answer": 1'], "line 3: malformed JSON"),
    ([GOOD_MATH, b'{"question": "caf\xe9", "answer": "1"}'], "line 2: not UTF-8 (byte 18"),
    ([b"\xef\xbb\xbf" + json.dumps(GOOD_MATH).encode(), GOOD_MATH], "line 1: starts with a "
                                                                   "UTF-8 byte-order mark"),
    ([GOOD_MATH, [1, 2]], "line 2: expected a JSON object, found list"),
    ([GOOD_MATH, {"question": "q"}], "line 2: missing 'answer'"),
    ([{"question": 3, "answer": "1"}], "line 1: 'question' must be a string, found an integer 3"),
    ([{"question": "q", "answer": True}], "'answer' must be a string or an integer or a number, "
                                          "found a boolean True"),
    ([{"question": "q", "answer": "1", "solution": ["x"]}], "'solution' must be a string"),
])
def test_math_file_problems_name_file_and_line(tmp_path, lines, expected):
    path = _write(tmp_path, lines)
    message = _error("math", path, eval_fraction=0.0)
    assert message.startswith(f"path={path!r} is invalid: ")
    assert expected in message, message


def test_empty_file_says_so(tmp_path):
    for lines in ([], ["", "  "]):
        path = _write(tmp_path, lines)
        assert "has no rows (an empty file)" in _error("math", path)


def test_every_bad_line_is_listed_up_to_a_cap(tmp_path):
    path = _write(tmp_path, [GOOD_MATH] + [{"question": "q"}] * 8)
    message = _error("math", path, eval_fraction=0.0)
    assert re.findall(r"line (\d+): missing 'answer'", message) == ["2", "3", "4", "5", "6"]
    assert message.endswith("... and 3 more")


@pytest.mark.parametrize("row,expected", [
    ({"fn_name": "f", "tests": []}, "missing 'prompt'"),
    ({"prompt": "p", "tests": "assert f()"}, "'tests' must be a list"),
    ({"prompt": "p", "tests": []}, "'tests' is empty"),
    ({"prompt": "p", "fn_name": "f", "tests": [{"input": 1, "output": 2}]},
     "tests[0]: 'input' must be a list"),
    ({"prompt": "p", "tests": [{"input": "1\n", "output": "2"}, {"input": "x"}]},
     "tests[1]: missing 'output'"),
    ({"prompt": "p", "tests": [{"input": ["1"], "output": "2"}]},
     "tests[0]: 'input' must be a string or an integer or a number, found a list"),
    ({"prompt": "p", "tests": [3]}, "tests[0] must be an object"),
])
def test_code_file_row_problems(tmp_path, row, expected):
    path = _write(tmp_path, [GOOD_CODE, row])
    message = _error("code", path, eval_fraction=0.0)
    assert f"line 2: {expected}" in message, message


def test_valid_files_still_load(tmp_path):
    math = tasks.get("math", path=_write(tmp_path, [GOOD_MATH, "", GOOD_MATH | {"answer": 2.5}],
                                         name="m.jsonl"), eval_fraction=0.0)
    assert [math.sample(i, 0).metadata["gold"] for i in range(2)] == ["2", "2.5"]
    code = tasks.get("code", path=_write(tmp_path, [GOOD_CODE], name="c.jsonl"),
                     eval_fraction=0.0)
    assert code.num_examples == 1
    # The bundled samples satisfy the same checks.
    assert tasks.get("math").num_examples > 0 and tasks.get("code").num_examples > 0

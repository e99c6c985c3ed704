"""grain prompt pipeline: determinism, groups, mixtures, epochs, exact restore in a new process."""
import collections
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ring_jax.config import ConfigError
from ring_jax.data import tasks
from ring_jax.data.pipeline import PromptSource, prompt_dataset, prompt_iterator
from ring_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def build(seed=0, group_size=3, num_epochs=2):
    return prompt_dataset([PromptSource(tasks.get("addition"), weight=3.0, num_prompts=30),
                           PromptSource(tasks.get("reverse"), weight=1.0, num_prompts=10)],
                          TOK, seed=seed, group_size=group_size, num_epochs=num_epochs)


def materialize(ds):
    return [ds[i] for i in range(len(ds))]  # random access: no prefetch threads needed


def fingerprint(records):
    return [(r["prompt_id"], r["sample_index"], r["task"], r["index"],
             r["prompt_tokens"].tolist()) for r in records]


def test_same_seed_same_order_other_seed_differs():
    a, b, c = (materialize(build(seed=s)) for s in (5, 5, 6))
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)


def test_groups_records_and_mixture():
    records = materialize(build(group_size=3))
    assert len(records) == 3 * 80  # 60 + 20 draws over two epochs, weights 3:1
    for start in range(0, len(records), 3):
        group = records[start:start + 3]
        assert [r["sample_index"] for r in group] == [0, 1, 2]
        assert len({r["prompt_id"] for r in group}) == 1
        assert group[0]["group_id"] == group[0]["prompt_id"] == start // 3
        assert fingerprint(group)[0][2:] == fingerprint(group)[2][2:]
    draws = records[::3]
    assert collections.Counter(r["task"] for r in draws) == {"addition": 60, "reverse": 20}
    # Each epoch covers every problem once, in a different order.
    addition = [r["index"] for r in draws if r["task"] == "addition"]
    assert sorted(addition[:30]) == sorted(addition[30:]) == list(range(30))
    assert addition[:30] != addition[30:]
    r = records[0]
    assert r["prompt_tokens"].dtype == np.int32
    assert TOK.decode(r["prompt_tokens"]) == TOK.apply_chat_template(r["prompt_text"])
    task = tasks.get(r["task"])
    assert task.score(r, task.sample(r["index"], r["seed"]).solution_text()).reward == 1.0


_RESTORE_SCRIPT = textwrap.dedent("""
    import json, sys
    from ring_jax.data import tasks
    from ring_jax.data.pipeline import PromptSource, prompt_dataset, prompt_iterator
    from ring_jax.data.tokenizer import ByteTokenizer
    ds = prompt_dataset([PromptSource(tasks.get("addition"), weight=3.0, num_prompts=30),
                         PromptSource(tasks.get("reverse"), weight=1.0, num_prompts=10)],
                        ByteTokenizer(), seed=7, group_size=3, num_epochs=2)
    it = prompt_iterator(ds)
    it.set_state(json.loads(sys.argv[1]))
    out = [next(it) for _ in range(int(sys.argv[2]))]
    print(json.dumps([(r["prompt_id"], r["sample_index"], r["task"], r["index"],
                       r["prompt_tokens"].tolist()) for r in out]))
""")


def test_checkpoint_mid_epoch_restores_in_new_process():
    it = prompt_iterator(build(seed=7), num_threads=2)
    for _ in range(37):  # mid-epoch and mid-group
        next(it)
    state = it.get_state()
    expected = fingerprint([next(it) for _ in range(50)])
    encoded = json.dumps(state)
    proc = subprocess.run([sys.executable, "-c", _RESTORE_SCRIPT, encoded, "50"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    restored = [tuple(x) for x in json.loads(proc.stdout.strip().splitlines()[-1])]
    assert restored == expected


def test_infinite_repeat_and_validation():
    ds = prompt_dataset(tasks.get("count"), TOK, num_prompts=4, group_size=2, num_epochs=None)
    it = prompt_iterator(ds)
    ids = [next(it)["prompt_id"] for _ in range(40)]
    assert ids == [i // 2 for i in range(40)]
    with pytest.raises(ConfigError, match="num_prompts"):
        PromptSource(tasks.get("addition"))
    with pytest.raises(ConfigError, match="group_size"):
        prompt_dataset(tasks.get("addition"), TOK, num_prompts=3, group_size=0)

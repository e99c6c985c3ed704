"""`decode_profile.op_kind`: the kind of an executed XLA:CPU op from its name, as the decode
op profile (issue 16) sums them. A wrong rule would move time between kinds: a YNNPACK matmul
fusion counted as elementwise, or a conditional (whose event spans the ops it runs, recorded
on their own) counted twice."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments",
                                "benchmarks"))
from decode_profile import op_kind  # noqa: E402


@pytest.mark.parametrize("name, kind", [
    ("ynn_fusion.9", "matmul"), ("dot.3", "matmul"),
    ("transpose_copy_fusion.11", "copy / layout"), ("wrapped_broadcast", "copy / layout"),
    ("multiply_multiply_fusion.13", "elementwise"), ("wrapped_tanh", "elementwise"),
    ("multiply_concatenate_fusion", "elementwise"),  # computes, not only moves
    ("select_gather_fusion", "gather / scatter / dynamic slices"),
    ("wrapped_scatter", "gather / scatter / dynamic slices"),
    ("compare_reduce_fusion", "reduce"), ("wrapped_reduce-window", "reduce"),
    ("sort.1", "sort / top-k"),
    ("cond.87", "control"), ("cond.1.clone", "control"), ("while.2", "control"),
])
def test_op_kind(name, kind):
    assert op_kind(name) == kind

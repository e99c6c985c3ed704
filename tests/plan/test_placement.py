"""Memory per device under the two engine placements (`plan.placement`), by hand; no libtpu."""
import pytest

from ring_jax.plan import placement, report

GiB = report.GiB


def _report(program, argument, temp):
    return report.ProgramReport(program=program, num_layers=2, argument=argument * GiB,
                                output=0.0, alias=0.0, temp=temp * GiB, code=0.0, flops=0.0,
                                bytes_accessed=0.0, compile_s=0.0)


def test_colocated_adds_the_idle_side_disaggregated_does_not():
    reports = {"rl_step": _report("rl_step", argument=10, temp=30),   # peak 40
               "prefill": _report("prefill", argument=6, temp=20),    # peak 26
               "decode": _report("decode", argument=5, temp=2)}       # peak 7, state 5
    colocated, disaggregated = placement.placement_rows(reports, 64, 16)
    # Training with the engine's weights + cache resident: 40 + 5 = 45; prefilling with the
    # train state resident: 26 + 10 = 36. (Adding the engine's peak instead of its resident
    # state would give 40 + 26 = 66.)
    assert colocated.train_peak == colocated.engine_peak == 45 * GiB
    assert (colocated.num_train_devices, colocated.num_engine_devices) == (64, 64)
    assert disaggregated.train_peak == 40 * GiB and disaggregated.engine_peak == 26 * GiB
    assert (disaggregated.num_train_devices, disaggregated.num_engine_devices) == (64, 16)
    assert colocated.fits(48 * GiB) and not colocated.fits(46 * GiB)
    assert disaggregated.fits(42.2 * GiB)
    table = placement.format_table([colocated, disaggregated], 95 * GiB)
    assert "| colocated | 64 | the same | 45 | 45 | yes |" in table
    assert "| disaggregated | 64 | 16 | 40 | 26 | yes |" in table


def test_needs_the_step_and_an_engine_program():
    with pytest.raises(ValueError, match="needs the rl_step and prefill or decode"):
        placement.placement_rows({"logprob": _report("logprob", 1, 1)}, 8, 8)
    rows = placement.placement_rows({"rl_step": _report("rl_step", 4, 4),
                                     "prefill": _report("prefill", 2, 1)}, 8, 8)
    assert rows[0].train_peak == (8 + 2) * GiB  # the prefill's arguments stand for the engine

"""The planner's arithmetic and argument checks; none of this needs libtpu."""
import dataclasses
import sys

import pytest

from ring_jax.config import ConfigError
from ring_jax.plan import check_depth, dump_options, hardware, report
from ring_jax.model import presets
from ring_jax.rollout.engine import EngineConfig
from ring_jax.train import experiment

GiB = report.GiB


def _report(num_layers, argument, temp, flops=0.0, alias=0.0):
    return report.ProgramReport(program="rl_step", num_layers=num_layers, argument=argument,
                                output=1.0, alias=alias, temp=temp, code=2.0, flops=flops,
                                bytes_accessed=10.0 * num_layers, compile_s=1.5)


def test_peak_and_fits_by_hand():
    r = _report(2, argument=10 * GiB, temp=5 * GiB, alias=3 * GiB)
    # 10 + 1 B - 3 (reused donated buffers) + 5 + 2 B.
    assert r.peak == 12 * GiB + 3.0
    assert r.fits(95 * GiB)
    assert r.fits(12.7 * GiB, headroom=0.95)  # 12.065 GiB allowed
    assert not r.fits(12.6 * GiB, headroom=0.95)  # 11.97 GiB allowed: a sum without alias fits
    assert not r.fits(12 * GiB, headroom=1.0)


def test_extrapolation_is_the_line_through_two_depths():
    # Depth 2: 10 GiB args, 4 GiB temp; depth 3: 13, 5. Per layer: +3, +1. Depth 20: 18 more.
    shallow = _report(2, argument=10 * GiB, temp=4 * GiB, flops=100.0)
    deeper = _report(3, argument=13 * GiB, temp=5 * GiB, flops=130.0)
    full = report.extrapolate(shallow, deeper, 20)
    assert full.num_layers == 20 and full.extrapolated_from == (2, 3)
    assert full.argument == 10 * GiB + 18 * 3 * GiB
    assert full.temp == 4 * GiB + 18 * GiB
    assert full.flops == 100.0 + 18 * 30.0
    assert full.bytes_accessed == 20.0 + 18 * 10.0
    assert full.output == 1.0 and full.code == 2.0  # constant in depth
    assert full.compile_s == 3.0
    assert full.temp_per_layer == 1 * GiB
    assert "| 20 (fit of 2, 3; temp +1 per layer) |" in report.format_table([full], 95 * GiB)
    # A layer never frees memory: a deeper compile with fewer temporaries (XLA's heap packing)
    # keeps the depth-N figure; extrapolating the dip would give 4 - 18 = -14 GiB at depth 20.
    dip = report.extrapolate(shallow, _report(3, argument=13 * GiB, temp=3 * GiB), 20)
    assert dip.temp == 4 * GiB and dip.temp_per_layer == -1 * GiB
    assert "temp -1 per layer, taken as 0) |" in report.format_table([dip], 95 * GiB)
    # A slope from non-consecutive depths would be off by their distance.
    with pytest.raises(ValueError, match="N and N \\+ 1"):
        report.extrapolate(shallow, _report(4, 16 * GiB, 6 * GiB), 20)


def test_table_marks_what_does_not_fit():
    table = report.format_table([_report(2, 10 * GiB, 4 * GiB), _report(3, 100 * GiB, 4 * GiB)],
                                95 * GiB)
    rows = table.splitlines()
    assert len(rows) == 4 and "fits 95 GiB" in rows[0]
    assert "| yes |" in rows[2] and "| **no** |" in rows[3]


def test_topology_names_and_hbm():
    assert hardware.parse_topology_name("v5p:4x4x4") == ("v5p", 64)
    assert hardware.parse_topology_name("v6e:8x8") == ("v6e", 64)
    for bad in ("v5p-64", "v9:2x2", "v5p:4x"):
        with pytest.raises(ConfigError, match="topology=.*generation one of"):
            hardware.parse_topology_name(bad)
    # v4 as described without megacore: two devices per chip share its 32 GiB.
    v4 = hardware.Topology("v4:2x2x2", "v4", 8, tuple(range(16)))
    assert v4.hbm_per_device == 16 * GiB
    assert hardware.Topology("v5p:2x2x1", "v5p", 4, tuple(range(4))).hbm_per_device == 95 * GiB


def test_mesh_spec():
    assert hardware.parse_mesh("fsdp=8,expert=8") == {"fsdp": 8, "expert": 8}
    for bad in ("fsdp=0", "pipe=2", "fsdp"):
        with pytest.raises(ConfigError, match="mesh=.*axis one of"):
            hardware.parse_mesh(bad)


def test_depth_must_keep_a_moe_layer():
    cfg = experiment.ExperimentConfig(model=presets.get("tiny"),
                                      engine=EngineConfig(max_len=1024))
    check_depth(cfg, 2)
    with pytest.raises(ConfigError, match="num_layers=1 is invalid: must be >= 2"):
        check_depth(cfg, 1)
    # A scan of a single MoE layer is not one more of the same: scanned programs need two.
    scanned = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=True))
    check_depth(scanned, 2, ["decode", "prefill"])
    check_depth(scanned, 3, ["rl_step"])
    with pytest.raises(ConfigError, match=r"num_layers=2 is invalid: must be >= 3 .*'logprob'"):
        check_depth(scanned, 2, ["decode", "logprob"])


def test_dump_goes_to_one_folder_per_program_and_depth():
    assert dump_options(None, "rl_step", 2) is None and dump_options("", "rl_step", 2) is None
    assert dump_options("/d", "rl_step", 2) == {"xla_dump_to": "/d/rl_step_L2"}
    assert dump_options("/d", "rl_step", 3) != dump_options("/d", "rl_step", 2)


def test_missing_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[tpu-aot\]"'):
        hardware.get_topology("v5p:2x2x1")

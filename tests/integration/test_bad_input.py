"""Bad input in heterogeneous mode: one clear error, quickly, and no process left behind
(procs.run fails the test if anything of the run's session survives)."""

from __future__ import annotations

import pytest

import procs
from conftest import GENERATE

CASES = {
    "ray executor": (["--tp", "2", "--backend", "ray"], {}, "needs the multiprocessing executor"),
    "tp zero": (["--tp", "0"], {}, "tensor_parallel_size"),
    "tp not dividing heads": (["--tp", "3"], {}, "must be divisible by tensor parallel size"),
    "bind list vs ranks": (["--tp", "2"], {"VLLM_CPU_OMP_THREADS_BIND": "0|1|0"}, "names 3 CPU list(s) but the plan has 2 CPU rank(s)"),
    "bind list overlap": (["--tp", "2"], {"VLLM_CPU_OMP_THREADS_BIND": "0-1|1"}, "is given to two CPU ranks"),
    "gpu override without gpus": (["--tp", "2"], {"HETERO_SHIM_GPU_RANKS": "1"}, "more GPU ranks than this node has GPUs (0)"),
    "more cpu ranks than cores": (["--tp", "4"], {}, "4 CPU rank(s) need at least 4 cores"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_clear_error(models, case):
    args, env, message = CASES[case]
    proc = procs.run_python([GENERATE, str(models["llama"]), "--device", "heterogeneous", "--enable", *args],
                            timeout=180, **env)
    assert proc.returncode != 0
    assert message in proc.stdout, proc.stdout[-3000:]
    assert "RESULT" not in proc.stdout


def test_unknown_device_value(models):
    proc = procs.run_python([GENERATE, str(models["llama"]), "--device", "cuda", "--enable"], timeout=180)
    assert proc.returncode != 0 and "device='cuda' is not supported" in proc.stdout

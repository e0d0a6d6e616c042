"""The catalogue of bad input: each case gets one clear error, quickly, and no process is left
behind (procs.run fails the test if anything of the run's session survives).

| bad input | where it is refused | test |
| --- | --- | --- |
| unsupported vLLM release | launcher exit 2; enable() raises UnsupportedVllmVersion | test_unsupported_release_* |
| unknown value of a setting (HETERO_SHIM_ENABLE=maybe, ...) | launcher exit 2; enable() raises; bootstrap exit 2 | test_bad_setting_* |
| unknown device value | LLM(device=...) / --device | test_unknown_device_value |
| Ray executor, TP 0, TP not dividing heads | engine config, before any worker | CASES |
| bind list vs CPU ranks, core given twice | rank plan | CASES |
| GPU-rank override above the node's GPUs | rank plan (says what to set) | CASES |
| VLLM_CPU_KVCACHE_SPACE not whole GiB, or more than the host has | rank plan (names the numbers) | CASES |
| engine built outside `if __name__ == "__main__":` where vLLM spawns it | engine config, one line | test_unguarded_script |
| more CPU ranks than cores | rank plan | CASES |
| native CPU kernels of another release | CPU rank: warning + pure-PyTorch kernels | tests/unit/test_reliability_logic.py |
| enable() after vLLM started an engine | warning (that engine stays stock) | test_lifecycle.py |
| parsers of every option and bind list | hypothesis | tests/unit/test_parsers.py |
"""

from __future__ import annotations

import pytest

import procs
from conftest import GENERATE

BOOTSTRAP = procs.REPO / "hetero_shim" / "_bootstrap"

CASES = {
    "ray executor": (["--tp", "2", "--backend", "ray"], {}, "needs the multiprocessing executor"),
    "tp zero": (["--tp", "0"], {}, "tensor_parallel_size"),
    "tp not dividing heads": (["--tp", "3"], {}, "must be divisible by tensor parallel size"),
    "bind list vs ranks": (["--tp", "2"], {"VLLM_CPU_OMP_THREADS_BIND": "0|1|0"}, "names 3 CPU list(s) but the plan has 2 CPU rank(s)"),
    "bind list overlap": (["--tp", "2"], {"VLLM_CPU_OMP_THREADS_BIND": "0-1|1"}, "is given to two CPU ranks"),
    "gpu override without gpus": (["--tp", "2"], {"HETERO_SHIM_GPU_RANKS": "1"},
                                  "more GPU ranks than this node has GPUs (0); set it to at most 0"),
    "kv space not whole GiB": (["--tp", "2", "--kv-cache-bytes", "0"], {"VLLM_CPU_KVCACHE_SPACE": "0.5"},
                               "VLLM_CPU_KVCACHE_SPACE='0.5' must be a whole number of GiB"),
    "kv space beyond the host": (["--tp", "2", "--kv-cache-bytes", "0"], {"VLLM_CPU_KVCACHE_SPACE": "4096"},
                                 "VLLM_CPU_KVCACHE_SPACE=4096 asks 4096.00 GiB of KV cache for each of 2 CPU rank(s)"),
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


SETTINGS = {
    "HETERO_SHIM_ENABLE": ("maybe", "HETERO_SHIM_ENABLE='maybe' is not understood; use 1 or 0"),
    "HETERO_SHIM_GPU_RANKS": ("x", "HETERO_SHIM_GPU_RANKS='x' must be a whole number of GPU ranks, 0 or more"),
    "HETERO_SHIM_DEVICE": ("gpu", "HETERO_SHIM_DEVICE='gpu' is not supported; the only value is 'heterogeneous'"),
    "HETERO_SHIM_GLOO_TIMEOUT_S": ("soon", "HETERO_SHIM_GLOO_TIMEOUT_S='soon' must be a whole number of seconds, "
                                           "1 or more (default 300)"),
    "HETERO_SHIM_HANG_DUMP": ("1.5", "HETERO_SHIM_HANG_DUMP='1.5' must be a whole number of seconds"),
    "HETERO_SHIM_COLLECTIVES": ("foo", "HETERO_SHIM_COLLECTIVES='foo' is not supported; use one of auto, shm, gloo"),
    "HETERO_SHIM_SHM_TIMEOUT": ("-1", "HETERO_SHIM_SHM_TIMEOUT='-1' must be a positive number"),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_bad_setting_is_refused_in_one_line(name):
    """The launcher exits 2 before running anything, enable() raises before patching, and a
    process under the bootstrap (a child vLLM would start) exits 2: each with the same line."""
    raw, message = SETTINGS[name]
    launcher = procs.run_python(["-m", "hetero_shim", "python", "-c", "print('ran')"], timeout=60, **{name: raw})
    assert launcher.returncode == 2 and launcher.stdout.strip() == f"hetero_shim: {message}", launcher.stdout
    code = ("import sys, hetero_shim\ntry:\n    hetero_shim.enable()\nexcept hetero_shim.HeteroConfigError as e:\n"
            "    print('RAISED', e)\nassert not hetero_shim.status()['enabled'] and 'vllm' not in sys.modules")
    api = procs.run_python(["-c", code], timeout=60, **{name: raw})
    assert api.returncode == 0 and api.stdout.strip() == f"RAISED {message}", api.stdout
    child_env = {"HETERO_SHIM_ENABLE": "1", name: raw, "PYTHONPATH": f"{BOOTSTRAP}:{procs.REPO}"}
    child = procs.run_python(["-c", "print('ran')"], timeout=60, **child_env)
    assert child.returncode == 2 and child.stdout.strip() == f"hetero_shim: {message}", child.stdout


def _fake_release(tmp_path, version: str) -> str:
    dist = tmp_path / f"vllm-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return f"{tmp_path}:{procs.REPO}"


def test_unsupported_release_refused_before_patching(tmp_path):
    """A vLLM distribution of an unsupported release earlier on the path: enable() raises before
    anything is patched or imported; the launcher exits 2 with the same one line."""
    path = _fake_release(tmp_path, "0.25.1")
    code = (
        "import sys, hetero_shim\n"
        "try:\n    hetero_shim.enable()\nexcept hetero_shim.UnsupportedVllmVersion as e:\n"
        "    print('REFUSED', e)\n"
        "assert not hetero_shim.status()['enabled'] and 'vllm' not in sys.modules\n"
    )
    proc = procs.run_python(["-c", code], timeout=60, PYTHONPATH=path)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("REFUSED hetero_shim supports vLLM 0.26.0"), proc.stdout
    assert 'found "vllm 0.25.1"' in lines[0] and "HETERO_SHIM_VLLM_TABLE" in lines[0]
    launcher = procs.run_python(["-m", "hetero_shim", "python", "-c", "print('ran')"], timeout=60, PYTHONPATH=path)
    assert launcher.returncode == 2 and launcher.stdout.strip() == "hetero_shim: " + lines[0][len("REFUSED "):]


UNGUARDED = """
import hetero_shim
hetero_shim.enable()
from vllm import LLM
llm = LLM(model={model!r}, device="heterogeneous", tensor_parallel_size=2, enforce_eager=True,
          max_model_len=256, kv_cache_memory_bytes=64 << 20)
print("RESULT built")
"""


def test_unguarded_script(models, tmp_path):
    """vLLM's CPU build spawns its engine core, which runs the script again: a script building its
    engine at the top level gets one line saying to add the guard, not Python's bootstrap error."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED.format(model=str(models["llama"])))
    proc = procs.run_python([str(script)], timeout=180)
    assert proc.returncode != 0 and "RESULT" not in proc.stdout
    assert 'put the code that creates the LLM under `if __name__ == "__main__":`' in proc.stdout, proc.stdout[-3000:]
    assert "bootstrapping phase" not in proc.stdout

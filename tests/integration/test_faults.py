"""A CPU rank killed (SIGKILL) during offline generation in heterogeneous mode: the engine
names the dead worker, generate() raises within 30 s, and no process of the run is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import procs

SCRIPT = textwrap.dedent(
    """
    import sys, time
    def main():
        import hetero_shim
        hetero_shim.enable()
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], device="heterogeneous", tensor_parallel_size=2, enforce_eager=True,
                  kv_cache_memory_bytes=64 << 20, dtype="float32", max_model_len=256)
        print("GENERATING", flush=True)
        start = time.monotonic()
        try:
            llm.generate(["Hello"] * 64, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        except Exception as exc:
            print(f"RAISED after {time.monotonic() - start:.1f}s: {type(exc).__name__}", flush=True)
            sys.exit(3)
        print("FINISHED", flush=True)
    if __name__ == "__main__":
        main()
    """
)


def find(pgid: int, title: str) -> int | None:
    for pid in procs.session_pids(pgid):
        try:
            if title in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return pid
        except OSError:
            continue
    return None


def test_killed_cpu_rank_is_reported_and_nothing_is_left(models, tmp_path):
    script = tmp_path / "victim.py"
    script.write_text(SCRIPT)
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(script), str(models["llama"])], env=procs.python_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "GENERATING" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        time.sleep(2)
        victim = find(proc.pid, "Worker_TP1")
        assert victim is not None, "no CPU rank 1 process found"
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        rc = proc.wait(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        left = procs.wait_session_gone(proc.pid, timeout=30)
        procs.kill_session(proc.pid)
    text = log.read_text()
    assert rc == 3 and "RAISED" in text, text[-3000:]
    assert elapsed < 30, f"generate() took {elapsed:.0f}s to fail after the kill"
    assert "VllmWorker-1 died unexpectedly" in text
    assert not left, f"processes left after the failure: {left}"

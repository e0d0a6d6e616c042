"""How a CPU rank's idle OpenMP threads wait, with the OpenMP runtime torch really loads: the
environment of ``HETERO_SHIM_CPU_OMP_WAIT=bounded`` lets them spin, then sleep; ``active`` keeps
them spinning. Measured as the CPU time a two-thread process spends while its main thread sleeps."""

import os
import subprocess
import sys

import pytest

from hetero_shim import settings
from hetero_shim.patches.startup import rank_process
from hetero_shim.planning.plan import RankPlan

IDLE_S = 2.0
PROBE = f"""
import time, torch
torch.set_num_threads(2)
a = torch.randn(256, 256)
for _ in range(20):
    a @ a  # parallel regions: the worker thread then waits as OMP_WAIT_POLICY / GOMP_SPINCOUNT say
start = time.process_time()
time.sleep({IDLE_S})
print(time.process_time() - start)
"""


def idle_cpu_seconds(choice: str, monkeypatch) -> float:
    monkeypatch.setenv(settings.CPU_OMP_WAIT, choice)
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        monkeypatch.delenv(name, raising=False)
    cores = tuple(sorted(os.sched_getaffinity(0))[:2])
    plan = RankPlan(world_size=2, gpu_ranks=1, cpu_lists=(cores,), pp_size=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env.update(rank_process.omp_environment(cores, plan))  # as a CPU rank on two cores gets it
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores for a spinning worker thread")
def test_bounded_spin_sleeps_and_active_keeps_spinning(monkeypatch):
    active = idle_cpu_seconds("active", monkeypatch)
    bounded = idle_cpu_seconds("bounded", monkeypatch)
    assert active > 0.6 * IDLE_S, f"the unbounded spin used {active:.2f} CPU-s of a {IDLE_S} s idle"
    assert bounded < 0.25 * IDLE_S, f"the bounded spin used {bounded:.2f} CPU-s of a {IDLE_S} s idle"

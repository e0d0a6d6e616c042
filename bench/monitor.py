"""Peak memory of one benchmark run: every process of its session (the engine front end, the
engine core, every worker), sampled from a thread of the harness.

- host: the sum of VmRSS over the processes (what ``ps`` shows; pages shared between
  processes, e.g. mapped checkpoint files or shared-memory queues, count once per process),
  and the sum of RssAnon (private anonymous memory only: no double counting, no page cache).
- GPU: the memory NVML (pynvml, else ``nvidia-smi``) reports for the session's processes; when
  none of their pids is visible (a container's pid namespace), the device's used memory minus
  what it used before the run started. ``gpu_method`` says which.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

from hetero_shim.testing.proctree import session_pids

GIB = 1 << 30


def host_memory(pids: list[int]) -> tuple[int, int]:
    """(sum of VmRSS, sum of RssAnon) in bytes."""
    rss = anon = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("RssAnon:"):
                anon += int(line.split()[1]) * 1024
    return rss, anon


class GpuProbe:
    """Device and per-process GPU memory through pynvml, else nvidia-smi; ``None`` from
    ``open()`` when this host shows no NVIDIA GPU."""

    def __init__(self, nvml=None):
        self.nvml = nvml
        if nvml:
            self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]

    @classmethod
    def open(cls) -> "GpuProbe | None":
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                return cls(pynvml)
        except Exception:  # no library, no driver, no device: try the command line tool
            pass
        if shutil.which("nvidia-smi"):
            probe = cls()
            try:
                if probe.describe():
                    return probe
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
        return None

    def _smi(self, *query: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    def describe(self) -> list[dict]:
        """[{name, total_bytes}] per device."""
        if self.nvml:
            out = []
            for h in self.handles:
                name = self.nvml.nvmlDeviceGetName(h)
                out.append({"name": name.decode() if isinstance(name, bytes) else name,
                            "total_bytes": int(self.nvml.nvmlDeviceGetMemoryInfo(h).total)})
            return out
        return [{"name": n, "total_bytes": int(float(t)) << 20} for n, t in self._smi("--query-gpu=name,memory.total")]

    def used(self) -> int:
        if self.nvml:
            return sum(int(self.nvml.nvmlDeviceGetMemoryInfo(h).used) for h in self.handles)
        return sum(int(float(u)) << 20 for (u,) in self._smi("--query-gpu=memory.used"))

    def per_process(self) -> dict[int, int]:
        found: dict[int, int] = {}
        if self.nvml:
            for h in self.handles:
                for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(h):
                    found[p.pid] = found.get(p.pid, 0) + int(p.usedGpuMemory or 0)
            return found
        for row in self._smi("--query-compute-apps=pid,used_memory"):
            if len(row) == 2 and row[0].isdigit() and row[1].replace(".", "").isdigit():
                found[int(row[0])] = found.get(int(row[0]), 0) + (int(float(row[1])) << 20)
        return found


class TreeMonitor:
    """Samples the session ``sid`` every ``interval`` seconds until ``stop()``; keeps peaks,
    overall and from ``mark_ready()`` on (the engine is up; loading is over)."""

    def __init__(self, sid: int, gpu: GpuProbe | None, interval: float = 0.25, gpu_baseline: int = 0):
        self.sid, self.gpu, self.interval = sid, gpu, interval
        self.gpu_baseline = gpu_baseline
        self.peak = {"host_rss": 0, "host_anon": 0, "gpu": 0}
        self.peak_ready = dict(self.peak)
        self.gpu_methods: set[str] = set()
        self.samples = 0
        self._ready = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "TreeMonitor":
        self._thread.start()
        return self

    def mark_ready(self) -> None:
        self._ready = True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _gpu_bytes(self, pids: list[int]) -> int:
        per = self.gpu.per_process()
        mine = [per[p] for p in pids if p in per]
        if mine:
            self.gpu_methods.add("per-process " + ("(NVML)" if self.gpu.nvml else "(nvidia-smi)"))
            return sum(mine)
        self.gpu_methods.add("device used minus its use before the run")
        return max(0, self.gpu.used() - self.gpu_baseline)

    def sample(self) -> None:
        pids = session_pids(self.sid)
        if not pids:
            return
        rss, anon = host_memory(pids)
        now = {"host_rss": rss, "host_anon": anon, "gpu": 0}
        if self.gpu is not None:
            try:
                now["gpu"] = self._gpu_bytes(pids)
            except Exception:  # a failed query must not end the run's monitoring
                pass
        self.samples += 1
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)
            if self._ready:
                self.peak_ready[key] = max(self.peak_ready[key], value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def result(self) -> dict:
        out = {
            "peak_host_rss_gib": self.peak["host_rss"] / GIB,
            "peak_host_anon_gib": self.peak["host_anon"] / GIB,
            "serving_peak_host_rss_gib": self.peak_ready["host_rss"] / GIB,
            "memory_samples": self.samples,
        }
        if self.gpu is not None:
            out |= {"peak_gpu_gib": self.peak["gpu"] / GIB, "serving_peak_gpu_gib": self.peak_ready["gpu"] / GIB,
                    "gpu_method": "; ".join(sorted(self.gpu_methods)) or None}
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def host_info() -> dict:
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem / GIB, 1)}

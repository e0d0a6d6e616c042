"""hetero_shim.testing.reference_cache: a kept GPU-only reference is found only for the same inputs."""

from __future__ import annotations

import json
import os

from hetero_shim.testing import reference_cache


def _model(tmp_path):
    model = tmp_path / "llama-0123"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64}))
    (model / "model.safetensors").write_bytes(b"\0" * 128)
    script = tmp_path / "generate.py"
    script.write_text("PROMPTS = ['a']\n")
    return model, script


def test_the_key_changes_with_every_input_it_depends_on(tmp_path):
    model, script = _model(tmp_path)
    args = {"tp": 1, "dtype": "float32", "max_tokens": 32, "env": {}}
    base = reference_cache.key(model, args, [script], "GPU A")
    assert reference_cache.key(model, dict(args), [script], "GPU A") == base
    assert reference_cache.key(model, {**args, "max_tokens": 16}, [script], "GPU A") != base
    assert reference_cache.key(model, {**args, "env": {"VLLM_X": "1"}}, [script], "GPU A") != base
    assert reference_cache.key(model, args, [script], "GPU B") != base
    script.write_text("PROMPTS = ['b']\n")
    changed_script = reference_cache.key(model, args, [script], "GPU A")
    assert changed_script != base
    (model / "config.json").write_text(json.dumps({"hidden_size": 65}))
    assert reference_cache.key(model, args, [script], "GPU A") != changed_script
    weights = model / "model.safetensors"
    before = reference_cache.key(model, args, [script], "GPU A")
    weights.write_bytes(b"\1" * 256)
    assert reference_cache.key(model, args, [script], "GPU A") != before


def test_a_stored_result_comes_back_with_its_log_and_nothing_else_does(tmp_path):
    cache = tmp_path / "cache"
    assert reference_cache.load(cache, "abc") is None
    log = tmp_path / "run.log"
    log.write_text("RESULT {}\n")
    reference_cache.store(cache, "abc", {"tokens": [[1, 2]], "run": {"rc": 0, "log": str(log)}})
    got = reference_cache.load(cache, "abc")
    assert got["tokens"] == [[1, 2]]
    assert got["run"]["log"] == str(cache / "abc.log") and (cache / "abc.log").read_text() == "RESULT {}\n"
    assert sorted(os.listdir(cache)) == ["abc.json", "abc.log"]  # no temporary file left
    (cache / "bad.json").write_text("{half")
    assert reference_cache.load(cache, "bad") is None

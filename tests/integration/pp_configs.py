"""Build vLLM engine configs in pipeline mode, in one process, without starting an engine.

    python pp_configs.py MODEL_2_LAYERS MODEL_4_LAYERS

Calls the same ``EngineArgs(...).create_engine_config()`` that ``LLM(...)`` and ``vllm serve``
call (the CLI through ``add_cli_args``/``from_cli_args``), once per case, and prints one
``CASE {...}`` JSON line each: the rank plan and the VLLM_PP_LAYER_PARTITION handed to vLLM, or
the error's type and message. No worker starts, so every case takes about a second.
"""

from __future__ import annotations

import json
import os
import sys

import hetero_shim

hetero_shim.enable()

from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

PARTITION = "VLLM_PP_LAYER_PARTITION"


def engine_args(model: str, **kw) -> EngineArgs:
    return EngineArgs(model=model, enforce_eager=True, dtype="float32", max_model_len=256,
                      kv_cache_memory_bytes=64 << 20, **kw)


def cli_args(model: str, *argv: str) -> EngineArgs:
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    return EngineArgs.from_cli_args(parser.parse_args(["--model", model, "--dtype", "float32", *argv]))


def run(name: str, make, env: dict[str, str] | None = None) -> None:
    before = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        make().create_engine_config()
        out = {"ok": True, "plan": hetero_shim.status()["plan"], "partition": os.environ.get(PARTITION)}
    except Exception as exc:  # noqa: BLE001 - the case records whatever was raised
        out = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print("CASE " + json.dumps({"name": name, **out}), flush=True)


def main() -> None:
    two, four = sys.argv[1], sys.argv[2]
    het = {"device": "heterogeneous"}
    run("explicit", lambda: engine_args(four, pipeline_parallel_size=2, hetero_gpu_layers=3, **het))
    run("cli explicit", lambda: cli_args(four, "--device", "heterogeneous", "--pipeline-parallel-size", "2",
                                         "--hetero-gpu-layers", "1"))
    run("automatic", lambda: engine_args(four, pipeline_parallel_size=2, **het))
    run("user partition", lambda: engine_args(four, pipeline_parallel_size=2, **het), {PARTITION: "1,3"})
    run("too many gpu layers", lambda: engine_args(four, pipeline_parallel_size=2, hetero_gpu_layers=5, **het))
    run("no layer left for cpu", lambda: engine_args(four, pipeline_parallel_size=2, hetero_gpu_layers=4, **het))
    run("pp larger than layers", lambda: engine_args(two, pipeline_parallel_size=3, **het))
    run("partition sum", lambda: engine_args(four, pipeline_parallel_size=2, **het), {PARTITION: "1,2"})
    run("gpu layers without pp", lambda: engine_args(four, hetero_gpu_layers=2, **het))
    run("cli gpu layers without pp", lambda: cli_args(four, "--device", "heterogeneous", "--hetero-gpu-layers", "2"))
    run("gpu layers not a number", lambda: engine_args(four, pipeline_parallel_size=2, hetero_gpu_layers="all",
                                                       **het))
    run("after errors", lambda: engine_args(four, pipeline_parallel_size=2, **het))


if __name__ == "__main__":
    main()

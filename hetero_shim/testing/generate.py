"""One offline generation run, printed as a JSON line 'RESULT {...}' (used by the tests).

    python -m hetero_shim.testing.generate MODEL --tp 2 [--device heterogeneous] [--enable] [--logprobs K]
"""

import argparse
import json
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size")
    parser.add_argument("--hetero-gpu-layers", default=None, help="hetero_gpu_layers (pipeline mode)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--enable", action="store_true", help="call hetero_shim.enable() first")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--backend", default=None, help="distributed_executor_backend")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--kv-cache-bytes", type=int, default=64 << 20, help="0: leave kv_cache_memory_bytes unset")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--logprobs", type=int, default=0,
                        help="also write the greedy run's top-K candidates per position as 'top' (closeness.py)")
    parser.add_argument("--compiled", action="store_true",
                        help="leave enforce_eager unset, so vLLM compiles as it would by default")
    parser.add_argument("--enable-expert-parallel", action="store_true", help="enable_expert_parallel=True")
    parser.add_argument("--also-sampled", action="store_true",
                        help="in the same engine, also generate with temperature 0.8 and seed 1234")
    opts = parser.parse_args()
    if opts.enable:
        import hetero_shim

        hetero_shim.enable()
    from vllm import LLM, SamplingParams

    from hetero_shim.testing.tiny_models import PROMPTS

    kwargs = dict(tensor_parallel_size=opts.tp, enforce_eager=not opts.compiled, dtype=opts.dtype, max_model_len=256)
    optional = {  # engine argument: the option's value, passed only when given (0 / 1 / None: left unset)
        "kv_cache_memory_bytes": opts.kv_cache_bytes or None,
        "gpu_memory_utilization": opts.gpu_memory_utilization,
        "max_num_batched_tokens": opts.max_num_batched_tokens or None,
        "pipeline_parallel_size": opts.pp if opts.pp != 1 else None,
        "device": opts.device or None,
        "hetero_gpu_layers": opts.hetero_gpu_layers,
        "distributed_executor_backend": opts.backend or None,
        "enable_expert_parallel": True if opts.enable_expert_parallel else None,
    }
    kwargs |= {name: value for name, value in optional.items() if value is not None}
    llm = LLM(model=opts.model, **kwargs)
    params = SamplingParams(temperature=opts.temperature, seed=opts.seed, max_tokens=opts.max_tokens,
                            logprobs=opts.logprobs or None)
    outs = llm.generate(PROMPTS, params)
    result = {}
    if opts.logprobs:
        result["top"] = [[sorted(([t, lp.logprob] for t, lp in step.items()), key=lambda c: -c[1])
                          for step in o.outputs[0].logprobs] for o in outs]
    if opts.also_sampled:
        sampled = llm.generate(PROMPTS, SamplingParams(temperature=0.8, seed=1234, max_tokens=opts.max_tokens))
        result["sampled_tokens"] = [list(o.outputs[0].token_ids) for o in sampled]
    result |= {
        "tokens": [o.outputs[0].token_ids for o in outs],
        "text": [o.outputs[0].text for o in outs],
        "shim": "hetero_shim" in sys.modules and sys.modules["hetero_shim"].status()["enabled"],
        "plan": sys.modules["hetero_shim"].status()["plan"] if "hetero_shim" in sys.modules else None,
        "kernels": sys.modules["hetero_shim"].status().get("cpu_kernels") if "hetero_shim" in sys.modules else None,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

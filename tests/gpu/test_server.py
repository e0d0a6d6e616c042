"""The OpenAI server in heterogeneous mode (``python -m hetero_shim vllm serve ... --device
heterogeneous``) answers /v1/completions (4 prompts) and /v1/chat/completions, plain and
streamed, with the texts of a GPU-only TP=1 server on the same weights, and stops on SIGTERM
within 60 s with nothing left; per model (--gpu-models, default llama) and TP size (--gpu-tp)."""

from __future__ import annotations

from hetero_shim.testing import server, tiny_models


def test_server_answers_as_gpu_only_server(gpu, evidence, server_case):
    name, tp = server_case
    model = tiny_models.get(tiny_models.NAMED[name])
    answers = {}
    try:
        ref = gpu.once(("server", str(model)), lambda: server.serve_and_ask(
            model, 1, False, server.free_port(), gpu.out / "reference" / f"server-{model.name}-gpu-tp1.log", gpu.env()))
        answers["reference"] = ref
        got = server.serve_and_ask(model, tp, True, server.free_port(), evidence.dir / f"server-hetero-tp{tp}.log",
                                   gpu.env())
        answers["hetero"] = got
        for key in [k for k in ref if not k.startswith("_")]:
            evidence.row(f"server {key}: hetero TP={tp} == GPU TP=1", ref[key] == got.get(key), repr(got.get(key))[:60])
        evidence.row("hetero server shutdown: exits on SIGTERM, nothing left", got["_exit"].startswith("exited")
                     and not got["_left"], f"{got['_exit']}; left: {got['_left'] or 'none'}")
    except Exception as exc:  # report, do not hang
        evidence.row("server check", False, f"{type(exc).__name__}: {exc}"[:300])
    evidence.save("answers", answers)
    evidence.check()

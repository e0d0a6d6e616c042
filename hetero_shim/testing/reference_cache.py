"""GPU-only reference runs kept between test sessions on one machine (``tests/gpu --gpu-ref-cache DIR``).

Each GPU test compares heterogeneous runs with stock GPU-only vLLM on the same weights; that
reference run costs about a minute on a fresh machine, once per pytest session. Several sessions
on one machine (the GPU machine's calls) compute the same references again. A reference is stock
vLLM's output for fixed inputs, so a result is reused only where everything it depends on is the
same: the model's files, the run's arguments and environment, the script that runs it, and the
installed vLLM, torch and GPU (``key``). A result is written whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path

from hetero_shim import versions


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "not installed"


def gpu_models() -> str:
    """The host's GPU models as the NVIDIA driver lists them (no CUDA context is made), or ""."""
    models = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            models += [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                       if line.startswith("Model:")]
        except OSError:
            pass
    return ", ".join(models)


def key(model: Path, args: dict, scripts: list[Path], device: str) -> str:
    """The cache key of a reference run: the model folder's files (name, size and, for all but the
    weights, content; the weights' names carry no content, so their size and modification time),
    ``args`` (the run's arguments and environment), the content of ``scripts`` (the runner and what it
    imports for prompts and models), the installed vLLM distribution and version (as the shim finds
    it: ``versions.installed``) and torch's, and ``device`` (the GPU's name)."""
    files = []
    for path in sorted(Path(model).iterdir()):
        if path.is_file():
            stat = path.stat()
            content = (f"{stat.st_size}:{stat.st_mtime_ns}" if path.suffix == ".safetensors"
                       else _file_digest(path))
            files.append((path.name, content))
    parts = {"model": [str(model), files], "args": args, "scripts": [_file_digest(p) for p in scripts],
             "vllm": repr(versions.installed()), "torch": _torch_version(), "device": device}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load(folder: Path, name: str) -> dict | None:
    """The result stored under ``name`` in ``folder``, or None."""
    path = Path(folder) / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def store(folder: Path, name: str, result: dict) -> None:
    """Keep ``result`` (and a copy of the log its ``run`` names) under ``name``; written to a
    temporary name and renamed, so a reader never sees half a result."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    log = result.get("run", {}).get("log")
    if log and Path(log).is_file():
        kept = folder / f"{name}.log"
        shutil.copyfile(log, f"{kept}.{os.getpid()}")
        os.replace(f"{kept}.{os.getpid()}", kept)
        result = {**result, "run": {**result.get("run", {}), "log": str(kept)}}
    tmp = folder / f"{name}.json.{os.getpid()}"
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, folder / f"{name}.json")

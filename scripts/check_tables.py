"""Check every patch table against the real vLLM wheel of its release (no import, no GPU).

For each supported release: list the table's targets (every site, aliases included, and
the CPU worker class the worker-selection patch names) and the symbols its compat tripwires
read, with their patterns; resolve them in the wheel's source with scripts/vllm_symbols.py,
and write tests/data/vllm_symbols/<release>.json. The unit tests tests/unit/test_tables.py
(targets, parameter positions) and tests/unit/test_tripwires.py (facts) then check the tables
against those manifests.

    python scripts/check_tables.py                      # download each wheel (~400 MB each)
    python scripts/check_tables.py --sources /tmp/vllm_wheels   # use src_<release>/ trees
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hetero_shim import versions
from hetero_shim.patches import tables
from hetero_shim.patches.startup import worker_selection

OUT = REPO / "tests" / "data" / "vllm_symbols"


def targets(release: str) -> list[dict]:
    """{"module", "name"[, "contains"]} for every symbol the release's table names or its tripwires read."""
    wanted: dict[tuple[str, str], list[str]] = {}

    def want(module: str, name: str, pattern: str | None = None) -> None:
        patterns = wanted.setdefault((module, name), [])
        if pattern is not None and pattern not in patterns:
            patterns.append(pattern)

    for patch in tables.table(release):
        for site in dict.fromkeys((patch.module, *patch.sites())):
            want(site, patch.name)
            if "." in patch.name:  # the class too (a dataclass __init__ is generated, not written)
                want(site, patch.name.rsplit(".", 1)[0])
        for fact in patch.tripwires:
            want(fact.module, fact.symbol, fact.pattern)
    module, _, cls = worker_selection.CPU_WORKER_CLS.rpartition(".")
    want(module, cls)
    return [
        {"module": module, "name": name, **({"contains": patterns} if patterns else {})}
        for (module, name), patterns in sorted(wanted.items())
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", help="folder with src_<release>/ trees instead of downloading")
    parser.add_argument("--release", action="append", help="only these releases")
    opts = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for release in opts.release or versions.SUPPORTED:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(targets(release), f)
        cmd = [sys.executable, str(REPO / "scripts" / "vllm_symbols.py"), "--version", release,
               "--targets", f.name, "--out", str(OUT / f"{release}.json")]
        if opts.sources:
            cmd += ["--source", str(Path(opts.sources) / f"src_{release}")]
        else:
            cmd += ["--download", release]
        print("==", release, flush=True)
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Check every patch table against the real vLLM wheel of its release (no import, no GPU).

For each supported release: list the table's targets (every site, aliases included, and
the CPU worker class the worker-selection patch names), resolve them in the wheel's source
with scripts/vllm_symbols.py, and write tests/data/vllm_symbols/<release>.json. The unit
test tests/unit/test_tables.py then checks the tables against those manifests.

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

from hetero_shim.patches import tables  # noqa: E402

OUT = REPO / "tests" / "data" / "vllm_symbols"


def targets(release: str) -> list[dict]:
    rows = []
    for patch in tables.table(release):
        for site in dict.fromkeys((patch.module, *patch.sites())):
            rows.append({"module": site, "name": patch.name})
            if "." in patch.name:  # the class too (a dataclass __init__ is generated, not written)
                rows.append({"module": site, "name": patch.name.rsplit(".", 1)[0]})
    module, _, cls = tables.CPU_WORKER_CLS.rpartition(".")
    rows.append({"module": module, "name": cls})
    return [dict(t) for t in {tuple(sorted(r.items())) for r in rows}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", help="folder with src_<release>/ trees instead of downloading")
    parser.add_argument("--release", action="append", help="only these releases")
    opts = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for release in opts.release or tables.SUPPORTED:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(sorted(targets(release), key=lambda t: (t["module"], t["name"])), f)
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

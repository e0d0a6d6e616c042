"""README.md's patch and release tables are generated from the ledger rows
(scripts/gen_readme_tables.py), and its Settings table names every environment variable the
shim reads or sets (hetero_shim/settings.py)."""

import re
import subprocess
import sys
from pathlib import Path

from hetero_shim import settings

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_readme_tables.py"


def test_readme_tables_match_the_rows():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO,
                          check=False)
    assert proc.returncode == 0, proc.stderr + "\nrun: python scripts/gen_readme_tables.py"


def test_check_mode_fails_on_a_stale_readme(tmp_path):
    readme = (REPO / "README.md").read_text()
    edited = readme.replace("| worker selection |", "| worker choice |", 1)
    assert edited != readme
    copy = tmp_path / "README.md"
    copy.write_text(edited)
    args = [sys.executable, str(SCRIPT), "--check", "--readme", str(copy)]
    assert subprocess.run(args, capture_output=True, cwd=REPO, check=False).returncode == 1
    subprocess.run([sys.executable, str(SCRIPT), "--readme", str(copy)], check=True, cwd=REPO)
    assert copy.read_text() == readme


def test_settings_table_names_every_variable():
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    names = {value for name, value in vars(settings).items()
             if name.isupper() and isinstance(value, str) and re.fullmatch(r"(HETERO_SHIM|VLLM)_[A-Z0-9_]+", value)}
    missing = sorted(n for n in names if f"`{n}`" not in table)
    assert not missing, f"README's Settings table lacks {missing}"

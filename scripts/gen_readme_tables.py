"""Write README.md's patch and release tables from the ledger rows (one source of truth).

The rows live in the concern modules (``hetero_shim/patches/startup/*``, ``per_step/*``), the
releases and where each ran for real in ``hetero_shim/versions.py``. This rewrites only what
lies between the markers ``<!-- patches:start -->`` / ``<!-- patches:end -->`` and
``<!-- releases:start -->`` / ``<!-- releases:end -->``; no vLLM is imported.

    python scripts/gen_readme_tables.py           # rewrite README.md
    python scripts/gen_readme_tables.py --check   # exit 1 if README.md differs (tests/unit/test_readme_tables.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hetero_shim import versions
from hetero_shim.patches import tables

README = REPO / "README.md"
MANIFESTS = REPO / "tests" / "data" / "vllm_symbols"
SECTIONS = ("patches", "releases")


def code(text: str) -> str:
    """Inline code in a table cell (a pipe would end the cell)."""
    return "`" + text.replace("|", "\\|") + "`"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def releases_label(releases: set[str]) -> str:
    """"" for every supported release, else runs of consecutive releases: "0.26.0 .. 0.32.0", "0.33.0"."""
    if set(versions.SUPPORTED) <= releases:
        return ""
    runs: list[list[str]] = []
    previous = None
    for i, release in enumerate(versions.SUPPORTED):
        if release in releases:
            if previous == i - 1 and runs:
                runs[-1].append(release)
            else:
                runs.append([release])
            previous = i
    return ", ".join(run[0] if len(run) == 1 else f"{run[0]} .. {run[-1]}" for run in runs)


def by_release(values: dict[str, set[str]], separator: str = "; ") -> str:
    """Values that hold for some releases only are prefixed with those releases."""
    parts = []
    for value, releases in values.items():
        label = releases_label(releases)
        parts.append(f"{label}: {value}" if label else value)
    return separator.join(parts)


def targets_text(patches: list) -> str:
    """One module's targets: "`module` : `A.f`, `A.g`", with where a copy is wrapped too (or only)."""
    text = f"{code(patches[0].module)} : " + ", ".join(code(p.name) for p in patches)
    aliases = patches[0].aliases
    if aliases:
        copies = ", ".join(code(a) for a in aliases)
        text += f" (its copy in {copies} only)" if not patches[0].wrap_primary else f" (+ its copy in {copies})"
    return text


def _groups(concern_module) -> list[dict]:
    """The module's rows over every release, grouped by (concern, why, remove when)."""
    groups: dict[tuple, dict] = {}
    for release in versions.SUPPORTED:
        by_module: dict[tuple, list] = {}  # rows of one module (same copies) are listed together
        for patch in concern_module.rows(release):
            group = groups.setdefault((patch.concern, patch.why, patch.remove_when), {
                "concern": patch.concern, "why": patch.why, "remove_when": patch.remove_when,
                "targets": {}, "upstream": {}, "stale": {}, "facts": {},
            })
            by_module.setdefault((id(group), patch.module, patch.aliases, patch.wrap_primary), []).append(patch)
            group["upstream"].setdefault(patch.upstream, set()).add(release)
            if patch.stale:
                group["stale"].setdefault(patch.stale, set()).add(release)
            for fact in patch.tripwires:
                group["facts"].setdefault(fact, set()).add(release)
        for key, patches in by_module.items():
            group = next(g for g in groups.values() if id(g) == key[0])
            group["targets"].setdefault(targets_text(patches), set()).add(release)
    return list(groups.values())


def _patch_table(groups: list[dict]) -> list[str]:
    newest = versions.SUPPORTED[-1]
    lines = [
        f"| concern | target (module : qualname) | why | upstream ({versions.SUPPORTED[0]} .. {newest}) | remove when |",
        "| --- | --- | --- | --- | --- |",
    ]
    for g in groups:
        remove_when = cell(g["remove_when"])
        for text, releases in g["stale"].items():
            remove_when += f"; **stale in {releases_label(releases) or 'every release'}**: {cell(text)}"
        lines.append(f"| {g['concern']} | {by_release(g['targets'], '; ')} | {cell(g['why'])} | "
                     f"{cell(by_release(g['upstream']))} | {remove_when} |")
    return lines


def _tripwire_table(groups: list[dict]) -> list[str]:
    lines = ["| concern | upstream fact the patch needs | in (module : symbol) | pattern | releases |",
             "| --- | --- | --- | --- | --- |"]
    seen = set()
    for g in groups:
        for fact, releases in g["facts"].items():
            if (g["concern"], fact) in seen:
                continue
            seen.add((g["concern"], fact))
            statement = fact.meaning if fact.present else f"not: {fact.meaning}"
            pattern = code(fact.pattern) if fact.present else f"no {code(fact.pattern)}"
            lines.append(f"| {g['concern']} | {cell(statement)} | {code(fact.module)} : {code(fact.symbol)} | "
                         f"{pattern} | {releases_label(releases) or 'all'} |")
    return lines


def patches_section() -> list[str]:
    startup, per_step = [], []
    for concern_module in tables.CONCERNS:
        for group in _groups(concern_module):
            (per_step if ".per_step." in concern_module.__name__ else startup).append(group)
    return [
        "### At start-up (`hetero_shim/patches/startup/`)",
        "",
        *_patch_table(startup),
        "",
        "### Every step (`hetero_shim/patches/per_step/`; applied only in processes in heterogeneous mode)",
        "",
        *_patch_table(per_step),
        "",
        "### Tripwires",
        "",
        ("Each patch names the facts about upstream's source that make it necessary. `scripts/check_tables.py` "
         "records per release whether each pattern occurs in its symbol's source, and `tests/unit/test_tripwires.py` "
         "fails when a fact stops holding, naming the patch that can go for that release."),
        "",
        *_tripwire_table(startup + per_step),
    ]


def _checked(release: str) -> str:
    path = MANIFESTS / f"{release}.json"
    if not path.exists():
        return "no"
    return "yes" if json.loads(path.read_text()).get("vllm_version") == release else "no"


def releases_section() -> list[str]:
    rows: list[tuple[list[str], str, str]] = []
    for release in versions.SUPPORTED:
        checked, ran = _checked(release), versions.RUN_FOR_REAL.get(release, versions.TABLE_CHECKED_ONLY)
        if rows and rows[-1][1:] == (checked, ran):
            rows[-1][0].append(release)
        else:
            rows.append(([release], checked, ran))
    return [
        "| release | table checked against its wheel | run for real |",
        "| --- | --- | --- |",
        *(f"| {', '.join(names)} | {checked} | {ran} |" for names, checked, ran in rows),
    ]


def render(readme: str) -> str:
    bodies = {"patches": patches_section(), "releases": releases_section()}
    for name in SECTIONS:
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        head, found, rest = readme.partition(start)
        _, found_end, tail = rest.partition(end)
        if not (found and found_end):
            raise SystemExit(f"README.md lacks the markers {start} ... {end}")
        readme = head + start + "\n" + "\n".join(bodies[name]) + "\n" + end + tail
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the rows")
    parser.add_argument("--readme", type=Path, default=README)
    opts = parser.parse_args(argv)
    current = opts.readme.read_text(encoding="utf-8")
    wanted = render(current)
    if opts.check:
        if wanted != current:
            print(f"{opts.readme}: the patch or release tables differ from the ledger rows; "
                  "run python scripts/gen_readme_tables.py", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        opts.readme.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

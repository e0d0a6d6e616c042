"""Resolve patch targets in a vLLM source tree or wheel without importing it.

Given a vLLM source directory (the directory holding ``vllm/`` or the ``vllm``
package directory itself) or a ``.whl`` file, and a list of (module, name)
targets, parse each module with ``ast`` and write a JSON manifest saying, per
module, whether it exists and, per requested (possibly dotted) name, whether
it is defined there and how:

* ``class``, ``function``, ``async_function`` (module level),
* ``method`` / ``async_method`` (a def inside a class, dotted name
  ``Class.method``), with ``staticmethod``/``classmethod`` flags,
* ``assignment`` (module- or class-level ``x = ...`` / ``x: T = ...``),
* ``import`` (``from M import x [as y]``; ``imported_from`` gives M, with
  relative imports resolved).

Functions get their ordered parameter names (``*args``/``**kw`` prefixed).
Definitions nested in module/class-level ``if``/``try`` blocks are found too;
when a name is bound more than once, the last binding is reported.

A target may carry ``"contains": [regex, ...]``: facts about the symbol's source
(the compat tripwires of hetero_shim's patches). Each regex is searched
(``re.MULTILINE``) in the symbol's source segment (the whole ``def``/``class``/
assignment, decorators excluded), and the manifest records under ``"contains"``
whether it occurs (``true``/``false``; an undefined symbol records none).

Usage::

    python scripts/vllm_symbols.py --version 0.32.0 --source DIR_OR_WHEEL \
        --targets targets.json --out tests/data/vllm_symbols/0.32.0.json
    python scripts/vllm_symbols.py --download 0.32.0 --targets targets.json \
        --out tests/data/vllm_symbols/0.32.0.json

``targets.json`` is a list of ``{"module": "vllm.x.y", "name": "Cls.meth"}``, each
optionally with ``"contains": ["regex", ...]``.
Only the standard library is used; the wheel is read with ``zipfile``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class Source:
    """Reads ``pkg/mod.py`` files from a directory or a wheel."""

    def __init__(self, path: str):
        self.path = path
        self.zip = zipfile.ZipFile(path) if zipfile.is_zipfile(path) else None

    def read(self, relpath: str) -> str | None:
        if self.zip is not None:
            try:
                return self.zip.read(relpath).decode("utf-8")
            except KeyError:
                return None
        # Accept both the parent of the package and the package dir itself.
        for root in (self.path, os.path.dirname(os.path.abspath(self.path))):
            full = os.path.join(root, relpath)
            if os.path.isfile(full):
                with open(full, encoding="utf-8") as f:
                    return f.read()
        return None

    def module(self, name: str) -> tuple[str | None, str | None, bool]:
        """Return (relpath, text, is_package) for a dotted module name."""
        base = name.replace(".", "/")
        for rel, is_pkg in ((base + ".py", False), (base + "/__init__.py", True)):
            text = self.read(rel)
            if text is not None:
                return rel, text, is_pkg
        return None, None, False


def _bindings(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Map each name bound by a statement list to its last binding node."""
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, _DEFS):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for tgt in node.targets:
                for n in ast.walk(tgt):
                    if isinstance(n, ast.Name):
                        out[n.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                out[alias.asname or alias.name] = node
        elif isinstance(node, (ast.If, ast.Try)):
            nested = node.body + node.orelse + getattr(node, "finalbody", [])
            for handler in getattr(node, "handlers", []):
                nested += handler.body
            out.update(_bindings(nested))
    return out


def _params(args: ast.arguments) -> list[str]:
    names = [a.arg for a in args.posonlyargs + args.args]
    if args.vararg:
        names.append("*" + args.vararg.arg)
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg:
        names.append("**" + args.kwarg.arg)
    return names


def _import_source(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_pkg else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _lookup(tree: ast.Module, qualname: str) -> ast.AST | None:
    """The node that binds ``qualname`` (classes walked by the dotted parts), or None."""
    scope: ast.AST = tree
    node: ast.AST | None = None
    parts = qualname.split(".")
    for i, part in enumerate(parts):
        node = _bindings(getattr(scope, "body", [])).get(part)
        if node is None or (i < len(parts) - 1 and not isinstance(node, ast.ClassDef)):
            return None
        scope = node
    return node


def facts(text: str, tree: ast.Module, qualname: str, patterns: list[str]) -> dict[str, bool]:
    """For each regex, whether it occurs in the source of ``qualname`` ({} if it is not defined)."""
    node = _lookup(tree, qualname)
    if node is None:
        return {}
    segment = ast.get_source_segment(text, node) or ""
    return {p: re.search(p, segment, re.MULTILINE) is not None for p in patterns}


def describe(tree: ast.Module, qualname: str, module: str, is_pkg: bool) -> dict:
    """Describe how ``qualname`` is bound in the parsed module."""
    node = _lookup(tree, qualname)
    if node is None:
        return {"defined": False}
    parts = qualname.split(".")
    in_class = len(parts) > 1
    info: dict = {"defined": True, "lineno": node.lineno}
    if isinstance(node, ast.ClassDef):
        info["kind"] = "class"
        info["bases"] = [ast.unparse(b) for b in node.bases]
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        prefix = "async_" if isinstance(node, ast.AsyncFunctionDef) else ""
        info["kind"] = prefix + ("method" if in_class else "function")
        info["params"] = _params(node.args)
        decos = [ast.unparse(d) for d in node.decorator_list]
        info["decorators"] = decos
        info["staticmethod"] = "staticmethod" in decos
        info["classmethod"] = "classmethod" in decos
    elif isinstance(node, ast.ImportFrom):
        alias = next(a for a in node.names if (a.asname or a.name) == parts[-1])
        info["kind"] = "import"
        info["imported_from"] = _import_source(node, module, is_pkg)
        info["original_name"] = alias.name
    else:
        info["kind"] = "assignment"
        info["scope"] = "class" if in_class else "module"
    if isinstance(node, _DEFS) and node.decorator_list and "decorators" not in info:
        info["decorators"] = [ast.unparse(d) for d in node.decorator_list]
    return info


def build_manifest(source: Source, targets: list[dict], version: str | None) -> dict:
    modules: dict[str, dict] = {}
    parsed: dict[str, tuple] = {}
    wanted: dict[tuple[str, str], list[str]] = {}  # (module, name) -> regexes, from every target naming it
    for target in targets:
        patterns = wanted.setdefault((target["module"], target["name"]), [])
        patterns += [p for p in target.get("contains", ()) if p not in patterns]
    for (mod, name), patterns in wanted.items():
        if mod not in modules:
            rel, text, is_pkg = source.module(mod)
            modules[mod] = {"exists": text is not None, "path": rel, "symbols": {}}
            tree = ast.parse(text) if text is not None else None
            parsed[mod] = (text, tree, is_pkg)
        text, tree, is_pkg = parsed[mod]
        info = describe(tree, name, mod, is_pkg) if tree is not None else {"defined": False}
        if patterns:
            info["contains"] = facts(text, tree, name, patterns) if tree is not None else {}
        modules[mod]["symbols"][name] = info
    if version is None:
        text = source.read("vllm/_version.py") or ""
        for node in ast.parse(text).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                if any(getattr(t, "id", "") == "__version__" for t in ast.walk(node)):
                    version = node.value.value
    return {"vllm_version": version, "source": os.path.basename(source.path),
            "modules": modules}


def download_wheel(version: str, dest: str) -> str:
    """pip-download the vllm wheel (no deps) and return its path."""
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
            f"vllm=={version}", "-d", dest]
    fallback = ["--only-binary=:all:", "--python-version", "3.12",
                "--implementation", "cp"]
    for plat in ("2_28", "2_31", "2_34", "2_35"):
        fallback += ["--platform", f"manylinux_{plat}_x86_64"]
    if subprocess.run(base).returncode != 0:
        subprocess.run(base + fallback, check=True)
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if not wheels:
        raise SystemExit(f"no wheel downloaded for vllm=={version}")
    return os.path.join(dest, wheels[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--version", help="vLLM version recorded in the manifest")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--source", help="vllm source directory or .whl file")
    group.add_argument("--download", metavar="VERSION",
                       help="pip-download vllm==VERSION into a temp dir and use it")
    ap.add_argument("--targets", required=True, help='JSON list of {"module","name"[,"contains"]}')
    ap.add_argument("--out", required=True, help="output JSON manifest path")
    args = ap.parse_args(argv)

    with open(args.targets, encoding="utf-8") as f:
        targets = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        path = download_wheel(args.download, tmp) if args.download else args.source
        manifest = build_manifest(Source(path), targets, args.version or args.download)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

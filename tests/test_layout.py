"""The package layout: ``vora`` (components and the training entry point) never imports ``merge_tools`` (vora-merge's
command line, which imports ``vora``), so there is no cycle between the two packages."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VORA = REPO / "vora"
OPTIONAL_ENGINES = ("vllm", "lmms_eval")  # the serve / eval extras: their modules import these at the top


def vora_modules() -> list[str]:
    names = []
    for path in sorted(VORA.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_importing_every_vora_module_never_imports_merge_tools():
    """A fresh interpreter imports every module of vora (those of a missing optional engine are skipped)."""
    code = (
        "import importlib, json, sys\n"
        "skipped = []\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as e:\n"
        f"        if (e.name or '').split('.')[0] not in {OPTIONAL_ENGINES!r}:\n"
        "            raise\n"
        "        skipped.append(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'merge_tools')\n"
        "print(json.dumps({'merge_tools': loaded, 'skipped': skipped}))\n"
    )
    modules = vora_modules()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(modules)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["merge_tools"] == [], f"importing vora loaded {result['merge_tools']}"
    assert len(modules) - len(result["skipped"]) >= 20  # the check really imported the package
    assert set(result["skipped"]) <= {"vora.integrations.vllm_model", "vora.integrations.lmms_eval_model"}


def test_no_vora_source_imports_merge_tools():
    """Also imports inside functions, which the import-order check cannot see."""
    found = []
    for path in sorted(VORA.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "merge_tools"]
    assert found == [], f"vora imports merge_tools (move what it needs into vora): {found}"

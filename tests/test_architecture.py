"""The layout's one rule, checked on the source: data flows one way and nothing imports upward."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import respiscan

PACKAGE = Path(respiscan.__file__).parent
# lowest first; a module may import its own layer and the ones before it, never a later one. bundle.py (the
# format) sits below training: training writes bundles, serving reads them, and the format imports neither
LAYERS = [("errors", "utils", "records", "figures", "extras"), ("data",), ("models",), ("runtime", "metrics"),
          ("bundle",), ("training",), ("serving",), ("evaluation",), ("experiments",), ("cli", "__main__")]


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_architecture.py")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("respiscan."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("respiscan."))
    return found


def test_nothing_imports_upward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if module == "respiscan":
            continue
        for imported in _imports(path):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    assert not upward, upward


def test_serving_loads_no_training_or_evaluation_module():
    code = ("import json, sys\n"
            "import respiscan.serving, respiscan.serving.torch_engine, respiscan.serving.onnx_engine\n"
            "import respiscan.serving.export, respiscan.serving.volume, respiscan.serving.explain\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('respiscan.training', "
            "'respiscan.evaluation', 'respiscan.experiments')))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []

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
LAYERS = [("errors", "utils", "records", "figures", "extras"), ("data",), ("models",),
          ("runtime", "metrics", "calibration"), ("bundle", "card"), ("training",), ("serving",), ("evaluation",),
          ("experiments",), ("cli", "__main__")]


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


def test_cli_onnx_predict_loads_no_heavy_module(bundle, synth_data, tmp_path):
    """The whole `respiscan predict --engine onnx` path, CLI included, in a fresh process: none of the modules
    that cost a cold one-image prediction its start-up (torch alone takes seconds)."""
    import shutil

    from respiscan.data.samples import discover
    from respiscan.serving.export import export_onnx

    exported = tmp_path / "bundle"
    shutil.copytree(bundle, exported)
    export_onnx(exported)
    pair = {m: next(str(s.path) for s in discover(synth_data) if s.modality == m) for m in ("xray", "ct")}
    heavy = ("torch", "timm", "torchvision", "matplotlib", "scipy", "sklearn", "pandas", "rich", "pydantic", "tqdm",
             # what PNG input, the torch-free engine and printing need none of: DICOM, NIfTI, export, the other
             # engine, the server
             "pydicom", "pylibjpeg", "highdicom", "nibabel", "onnx", "openvino", "fastapi", "uvicorn", "starlette")
    argv = ["respiscan", "predict", str(exported), "--xray", pair["xray"], "--ct", pair["ct"], "--engine", "onnx",
            "--json"]
    code = ("import atexit, json, runpy, sys\n"
            f"atexit.register(lambda: open({str(tmp_path / 'modules.json')!r}, 'w').write(json.dumps(sorted("
            f"m for m in sys.modules if m.split('.')[0] in {heavy!r}))))\n"
            f"sys.argv = {argv!r}\n"
            "runpy.run_module('respiscan', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 <= result["probability"] <= 1
    assert json.loads((tmp_path / "modules.json").read_text()) == []
    # the CLI's one-case engine (sessions built for a few images) gives the library's default engine's result
    from respiscan.serving import load

    assert abs(result["probability"] - load(exported, "onnx").predict(**pair)["probability"]) <= 1e-6

"""The shape of the code base: the library apart from the application, inference apart from the training
engine, one error hierarchy, no test hooks or references to documents outside the repository."""

import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import scm
import scm.errors

SRC = Path(__file__).resolve().parents[1] / "src" / "scm"
LIBRARY = [p for p in SRC.rglob("*.py") if "app" not in p.relative_to(SRC).parts and p.name != "__main__.py"]


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m for m in sys.modules if m.startswith('scm'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_library_never_imports_the_application():
    modules = [m.name for m in pkgutil.walk_packages(scm.__path__, "scm.")
               if not m.name.startswith("scm.app") and m.name != "scm.__main__"]
    loaded = _imported_after("; ".join(f"import {m}" for m in modules))
    assert set(modules) <= loaded and not any(m.startswith("scm.app") for m in loaded)
    for path in LIBRARY:
        assert not re.search(r"^\s*(from|import) scm\.app", path.read_text(), flags=re.M), path


def test_inference_never_imports_the_training_engine():
    loaded = _imported_after("import scm.runs, scm.generate, scm.evaluate, scm.sampling, scm.teachers")
    assert not any(m.startswith("scm.train") for m in loaded), sorted(loaded)
    assert "__getattr__" not in (SRC / "train" / "__init__.py").read_text()  # no lazy import to hide a cycle


def test_one_error_hierarchy():
    classes = [c for _, c in inspect.getmembers(scm.errors, inspect.isclass)]
    errors = [c for c in classes if issubclass(c, Exception) and not issubclass(c, Warning)]
    assert len(errors) >= 8 and all(issubclass(c, scm.errors.ScmError) for c in errors)
    assert all(issubclass(c, scm.errors.ScmWarning) for c in classes if issubclass(c, Warning))
    for path in SRC.rglob("*.py"):  # every error class of scm is defined in scm.errors
        if path.name != "errors.py":
            assert not re.search(r"^class \w*(Error|Stopped)\(", path.read_text(), flags=re.M), path


def test_library_code_has_no_test_hooks_flags_or_outside_references():
    for path in LIBRARY:
        text = path.read_text()
        assert "SCM_TEST" not in text and "objective_wrapper" not in text, path
        assert "__file__" not in text and "parents[" not in text, path  # no path into the repository checkout
        assert not re.search(r"\bspec §|platform notes", text), path  # cite the paper or files in this repository
        for literal in re.findall(r"f?\"[^\"\n]*\"", text):  # messages name settings, not command-line flags
            words = literal.strip('f"')
            if " " in words:  # a message (a lone "--flag" literal is an argument of a subprocess)
                assert not re.search(r"(^|[\s(])--[a-z]", words), (path, literal)


def test_functions_are_short_enough_to_read_at_once():
    import ast

    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{path.relative_to(SRC)}:{node.lineno} {node.name} has {length} lines"


def test_configuration_and_scms_own_networks_do_not_load_the_diffusers_interop():
    """The network registry finds the diffusers student by name, on use: a run of scm's own networks never loads
    scm.diffusers (nor diffusers)."""
    loaded = _imported_after("import scm.config, scm.nets, scm.runs, scm.generate")
    assert not any(m.startswith("scm.diffusers") for m in loaded), sorted(loaded)


def test_the_application_has_no_import_cycle():
    """scm.app's modules import each other one way: the commands import the shared helpers, never each other back."""
    graph = {}
    for path in (SRC / "app").glob("*.py"):
        mod = f"scm.app.{path.stem}"
        graph[mod] = set(re.findall(r"^\s*(?:from|import) (scm\.app\.\w+)", path.read_text(), flags=re.M)) - {mod}

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in graph.get(a, ()))

    assert not [m for m in graph if reaches(m, m)], graph


DRIVER = """
import sys
from scm.app.cli import main
sys.argv = ["scm", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code
print("TRAINING MODULES", sorted(m for m in sys.modules if m.startswith("scm.train")), "EXIT", code)
"""


def test_inference_commands_never_load_the_training_engine(tmp_path):
    """Each inference command, in a fresh interpreter, as far as it goes with these inputs (sample and data encode
    to the end; eval, serve and ema sweep past loading their run, up to a reference, an address or snapshots that
    are not there): not one scm.train module is loaded."""
    import numpy as np
    import pytest

    pytest.importorskip("diffusers")
    pytest.importorskip("starlette")
    from conftest import save_tiny_vae

    teacher = str(SRC.parents[1] / "demo" / "teacher")
    save_tiny_vae(tmp_path / "vae")
    np.savez(tmp_path / "rgb.npz", x=np.zeros((2, 32, 32, 3), np.uint8))
    commands = {
        "sample": (["sample", "--ckpt", teacher, "--nfe", "3", "--n", "2", "--out", str(tmp_path / "s.png")], 0),
        "eval": (["eval", "--ckpt", teacher, "--ref", str(tmp_path / "none.npz"), "--nfe", "3", "--n", "2"], 2),
        "serve": (["serve", "--ckpt", teacher, "--host", "256.0.0.1", "--device", "cpu"], 2),
        "data encode": (["data", "encode", "--vae", str(tmp_path / "vae"), "--data", str(tmp_path / "rgb.npz"),
                         "--out", str(tmp_path / "lat"), "--no-progress"], 0),
        "ema sweep": (["ema", "sweep", teacher, "--ref", "mnist", "--out", str(tmp_path / "sw"), "--nfe", "3"], 2),
    }
    for name, (args, expected) in commands.items():
        proc = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True)
        assert proc.stdout.strip().endswith(f"EXIT {expected}"), (name, proc.stdout, proc.stderr[-2000:])
        assert "TRAINING MODULES [] " in proc.stdout, (name, proc.stdout)


START_DRIVER = """
import sys
from scm.app.cli import app

def commands(group, prefix=()):
    for c in group.registered_commands:
        yield (*prefix, c.name or c.callback.__name__.replace("_", "-").rstrip("-"))
    for g in group.registered_groups:
        yield from commands(g.typer_instance, (*prefix, g.name))

done = []
for args in [[], *([*c, "--help"] for c in commands(app))] + [a.split() for a in sys.argv[1:]]:
    try:
        app(args, prog_name="scm")
    except SystemExit as e:
        done.append((" ".join(args), e.code))
    assert "torch" not in sys.modules and "numpy" not in sys.modules, (args, done)
print("DONE", len(done), sorted({code for _, code in done}))
"""


def test_the_command_line_and_its_help_start_without_torch(tmp_path):
    """`import scm`, `scm`, every subcommand's --help, and arguments that are wrong on their face (sample's --out
    and --ts, eval's --ts, serve's --max-connections) are answered without importing torch (or numpy): the command
    line starts at once."""
    code = "import sys, scm, scm.errors, scm.defaults; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert scm.objectives.__name__ == "scm.objectives"  # the maths core is still an attribute of the package
    bad = [f"sample --ckpt {tmp_path} --out {tmp_path}/x.txt", f"sample --ckpt {tmp_path} --out x.png --ts 1,a",
           f"eval --ckpt {tmp_path} --ref mnist --ts 1,b", f"serve --ckpt {tmp_path} --max-connections 1"]
    proc = subprocess.run([sys.executable, "-c", START_DRIVER, *bad], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, codes = proc.stdout.split("DONE ")[1].split(" ", 1)
    assert int(count) >= 14 and codes.strip() == "[0, 2]", proc.stdout[-500:]
    assert "--out" in proc.stderr and "--ts '1,a'" in proc.stderr and "--ts '1,b'" in proc.stderr, proc.stderr[-2000:]
    assert "--max-connections 1: must be at least 2" in proc.stderr, proc.stderr[-2000:]

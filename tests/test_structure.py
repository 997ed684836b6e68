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
    errors = [c for _, c in inspect.getmembers(scm.errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(errors) >= 8 and all(issubclass(c, scm.errors.ScmError) for c in errors)
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

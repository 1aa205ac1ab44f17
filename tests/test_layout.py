"""The package layout: kernels/ and bench/ import as eqm_kernels and eqm_bench, with no sys.path edits anywhere."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
EDIT = re.compile(r"sys\.path(\.(insert|append|extend|remove|pop)\b|\s*\+?=[^=]|\[.*\]\s*=[^=])")


def test_no_sys_path_edits():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for folder in ("eqm", "kernels", "bench", "tests")
                 for p in sorted((ROOT / folder).rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1) if EDIT.search(line)]
    assert not offenders, f"sys.path edited at {offenders}"


def test_kernels_and_bench_import_by_their_own_names(tmp_path):
    """From a folder outside the checkout, so only the installed names can resolve."""
    code = ("import eqm_kernels, eqm_bench.throughput, eqm_bench.kernel_ops, importlib.util;"
            "print(eqm_kernels.__file__); print(importlib.util.find_spec('kernels') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    path, no_kernels = out.stdout.split()
    assert pathlib.Path(path).resolve() == ROOT / "kernels" / "__init__.py"
    assert no_kernels == "True", "this project must not install a top-level 'kernels' module"

"""The package layout: kernels/ and bench/ import as eqm_kernels and eqm_bench, with no sys.path edits anywhere."""
import os
import pathlib
import re
import shutil
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


def _cache_tag(pkg_parent, env_tag=None):
    env = {**os.environ, "PYTHONPATH": str(pkg_parent)}
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)
    if env_tag:
        env["TORCH_COMPILE_CACHE_KEY_TAG"] = env_tag
    code = "import eqm_kernels, torch; print(eqm_kernels.__file__); print(torch.compiler.config.cache_key_tag)"
    out = subprocess.run([sys.executable, "-c", code], cwd=pkg_parent, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0].startswith(str(pkg_parent)), out  # the copy was imported, not the installed package
    return out[1]


def test_compile_cache_key_follows_the_kernels_source(tmp_path):
    """A warm torch.compile cache replays a custom op's old autograd code (wrong gradients after an upgrade):
    importing the kernels tags every cache key with a hash of their source, so edited kernels miss the cache."""
    for name in ("same", "edited"):
        shutil.copytree(ROOT / "kernels", tmp_path / name / "eqm_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "edited" / "eqm_kernels" / "adaln.py", "a") as f:
        f.write("\n# an edit\n")
    same, edited = _cache_tag(tmp_path / "same"), _cache_tag(tmp_path / "edited")
    assert same.startswith("eqm_kernels-") and same != edited
    assert _cache_tag(tmp_path / "same") == same  # stable across processes
    assert _cache_tag(tmp_path / "same", env_tag="mine") == f"mine|{same}"  # a user's own tag is kept

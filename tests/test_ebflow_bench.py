"""bench/ebflow.py: the JSON interface and the exponent fit."""
import importlib.util
import json
import math
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "ebflow.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ebflow", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fit_exponent_recovers_power_laws(bench):
    dims = [64, 256, 784, 3072]
    assert bench.fit_exponent(dims, [1e-9 * d ** 3 for d in dims]) == pytest.approx(3.0)
    assert bench.fit_exponent(dims, [5e-7 * d ** 2 for d in dims]) == pytest.approx(2.0)


def test_bench_writes_json_csv_png(bench, tmp_path, capsys):
    path = tmp_path / "r.json"
    bench.main(["--dims", "8", "4", "16", "--losses", "ml", "ssm", "fdssm", "--steps", "1", "--warmup", "0",
                "--batch-size", "4", "--json", str(path), "--threads", "1"])
    out = json.loads(path.read_text())
    assert [(r["D"], r["loss"]) for r in out["results"]] == [(d, n) for d in (4, 8, 16) for n in ("ml", "ssm", "fdssm")]
    assert all(r["seconds_per_step"] > 0 for r in out["results"])
    assert set(out["exponents"]) == {"ml", "ssm", "fdssm"} and all(math.isfinite(v) for v in out["exponents"].values())
    assert (tmp_path / "r.csv").read_text().startswith("D,loss,seconds_per_step")
    assert (tmp_path / "r.png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "speed-up over ml" in text and "growth exponent" in text
    with pytest.raises(SystemExit):
        bench.main(["--losses", "nope"])

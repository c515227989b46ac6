"""`make demo` (bench/demo.py) end to end at tiny sizes on a tiny model."""

import importlib.util
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "bench" / "demo.py"


def test_demo_prints_every_method_and_the_packed_speed(capsys, model_dir, monkeypatch):
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "demo", demo)  # its dataclass looks itself up there
    spec.loader.exec_module(demo)
    demo.main(["--model", model_dir, "--text", "builtin", "--calib-windows", "4",
               "--eval-windows", "2", "--seqlen", "32", "--proxsparse-steps", "2",
               "--new-tokens", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("dense ", "magnitude", "wanda", "sparsegpt", "proxsparse 2:4 "))]
    assert [row[0] for row in rows] == ["dense", "magnitude", "wanda", "sparsegpt", "proxsparse"]
    assert all(float(row[-3]) > 1 for row in rows)  # perplexity, prune s, row s
    assert "ProxSparse: its defaults, 2 steps" in out
    assert "packed decodes" in out and "same greedy tokens: yes" in out
    assert "demo wall time" in out

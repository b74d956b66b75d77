"""bench/posttrain.py end to end at its smallest: every workload runs on both sides (ours and TRL), the two
train on the same token count, and the JSON it writes holds positive rates and ratios."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_posttrain_bench_smoke(tmp_path):
    import posttrain

    out = tmp_path / "posttrain_bench.json"
    argv = ["--steps", "1", "--warmup", "0", "--batch-size", "1", "--vocab", "512", "--trl-precompute"]
    argv += ["--out", str(out)]
    returned = posttrain.main(argv)
    record = json.loads(out.read_text())
    assert record["results"] == json.loads(json.dumps(returned["results"]))
    names = [r["workload"] for r in record["results"]]
    assert names[0] == "SFT" and len(names) == 4 and all(n.startswith("DPO") for n in names[1:])
    for r in record["results"]:
        for side in ("ours", "trl"):
            assert r[side]["steps"] == 1 and r[side]["tokens"] > 0 and r[side]["tokens_per_s"] > 0
        assert r["ours"]["tokens"] == r["trl"]["tokens"], r["workload"]  # the same data on both sides
        assert r["ratio"] > 0
    assert record["config"]["vocab"] == 512 and record["precompute_s"]["ours_precompute_s"] > 0

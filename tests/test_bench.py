"""The benchmark harness end to end on tiny models (`--weights`): children for both sides, the same-work check
and the JSON report. The figures themselves are for docs/benchmarks.md, never asserted on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ldm_inpaint.bench import main


@pytest.mark.parametrize("family", ["sd_inpaint", "sdxl_inpaint"])
def test_quick_bench_runs_both_sides_and_checks_the_same_work(family, request, tmp_path):
    folder = request.getfixturevalue(f"{family}_dir")
    report = tmp_path / "results.json"
    sdxl = family.startswith("sdxl")
    args = ["--quick", "--weights", str(folder), "--size", "64", "--json", str(report)]
    args += ["--sdxl", "--dtype", "fp32"] if sdxl else ["--dtype", "fp32,bf16"]
    done = subprocess.run([sys.executable, "-m", "ldm_inpaint.bench", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ours/diffusers" in done.stdout
    r = json.loads(report.read_text())
    assert r["family"] == ("sdxl" if sdxl else "sd15")
    fp32 = r["results"]["fp32"]
    assert fp32["checks"]["within_tolerance"], fp32["checks"]
    for side in ("ours", "diffusers"):
        got = fp32["samples"][side]
        assert {"import_s", "load_s", "unet_s", "vae_encode_s", "vae_decode_s", "e2e_s", "peak_rss_gib"} <= set(got)
        assert len(got["load_s"]) == 2  # one "parts" child and one "e2e" child per side
    if not sdxl:  # bf16 (a dtype whose VAE handling differs by family) and its PSNR against fp32
        assert set(r["results"]["bf16"]["psnr_vs_fp32_db"]) == {"ours", "diffusers"}


def test_weights_that_are_not_a_folder_are_refused(tmp_path, capsys):
    assert main(["--weights", str(tmp_path)]) == 2
    assert "not a diffusers folder" in capsys.readouterr().err

"""The soak benchmark (sdrt.bench.soak) itself, briefly: a short run against the tiny model passes, and its checks
can fail (a 200 whose images carry another seed is reported)."""

import json

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")


def test_a_short_soak_passes(tiny_sd, tmp_path):
    from sdrt.bench.soak import main

    output = tmp_path / "soak.json"
    code = main(["--model", str(tiny_sd[1]), "--requests", "40", "--clients", "3", "--workdir", str(tmp_path),
                 "--output", str(output)])  # fmt: skip
    result = json.loads(output.read_text())
    assert code == 0 and result["passed"], result["failures"]
    assert result["requests_sent"] == 40 and result["server_errors_or_dropped"] == 0
    assert result["images_checked_for_their_seed"] > 0 and result["end"]["idle"]
    assert set(result["statuses"]["bad"]) <= {"400", "413", "422"}


def test_a_wrong_seed_is_a_failure():
    """can-fail twin: the seed check reports an answer whose info and infotext name another seed."""
    import base64
    import io

    from PIL import Image, PngImagePlugin

    from sdrt.bench.soak import Soak

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x\nSteps: 2, Seed: 99, Size: 64x64")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    soak = Soak("http://127.0.0.1:1", 1, float("inf"), 0)
    answer = {"images": [base64.b64encode(buffer.getvalue()).decode()], "info": json.dumps({"all_seeds": [99]})}
    soak.check_seeds(0, answer, 99, 1)
    assert soak.failures == []
    soak.check_seeds(1, answer, 100, 1)
    assert len(soak.failures) == 2  # the info's seeds and the infotext's


def test_rss_slope():
    from sdrt.bench.soak import rss_report, slope

    assert slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2)
    flat = [(t, 10 * t, 100 * 2**20) for t in range(10)]
    assert rss_report(flat)["second_half_slope_mib_per_1000_requests"] == 0
    growing = [(t, 100 * t, (100 + t) * 2**20) for t in range(10)]  # 1 MiB per 100 requests
    assert rss_report(growing)["second_half_slope_mib_per_1000_requests"] == pytest.approx(10)

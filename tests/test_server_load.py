"""Load: 50 requests from 8 concurrent clients against a server with a 3-job queue.

Every request gets its own image (its seed in the infotext) or a clean 429 with Retry-After; none is lost or
mixed up; the server's RSS settles: a second round of 50 adds at most ROUND_GROWTH_MIB.
"""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from server_fixture import decode_b64, running_server

pytest.importorskip("fastapi", reason="the serve extra is not installed")

REQUESTS, CLIENTS, QUEUE = 50, 8, 3
BACKOFF_S = 0.1  # a client that got a 429 waits this long before its next request (not a retry of the same one)
ROUND_GROWTH_MIB = 64  # a second identical round may not grow the server's RSS by more than this
TOTAL_GROWTH_MIB = 256  # nor may both rounds together, over the RSS after warm-up


def run_round(url: str, first_seed: int) -> dict:
    """REQUESTS txt2img calls from CLIENTS threads; {seed: (status, body or Retry-After)}."""
    results, lock = {}, threading.Lock()

    def one(seed: int):
        request = {"prompt": "load", "width": 64, "height": 64, "steps": 3, "seed": seed}
        res = requests.post(url + "/sdapi/v1/txt2img", json=request, timeout=120)
        outcome = (res.status_code, res.headers.get("Retry-After") if res.status_code == 429 else res.json())
        with lock:
            results[seed] = outcome
        if res.status_code == 429:
            time.sleep(BACKOFF_S)

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, range(first_seed, first_seed + REQUESTS)))
    return results


def check_round(results: dict) -> tuple[int, int]:
    assert len(results) == REQUESTS
    ok = full = 0
    for seed, (status, body) in results.items():
        if status == 200:
            info = json.loads(body["info"])
            assert info["all_seeds"] == [seed] and f"Seed: {seed}," in info["infotexts"][0]
            image = decode_b64(body["images"][0])
            assert image.size == (64, 64) and image.info["parameters"] == info["infotexts"][0]
            ok += 1
        else:
            assert status == 429, (seed, status, body)
            assert body is not None and int(body) >= 1  # Retry-After in whole seconds
            full += 1
    return ok, full


def test_load_every_request_answered_and_memory_settles(tiny_sd, tmp_path):
    psutil = pytest.importorskip("psutil")
    with running_server(tiny_sd[1], tmp_path, "--max-queue", str(QUEUE)) as server:
        process = psutil.Process(server.process.pid)
        check_round(run_round(server.url, 10_000))  # warm-up: sessions, thread pools, allocator
        rss0 = process.memory_info().rss
        ok1, full1 = check_round(run_round(server.url, 20_000))
        rss1 = process.memory_info().rss
        ok2, full2 = check_round(run_round(server.url, 30_000))
        rss2 = process.memory_info().rss
        assert ok1 >= QUEUE + 1 and ok2 >= QUEUE + 1 and full1 + full2 > 0  # both outcomes happen
        mib = 2**20
        assert (rss2 - rss1) / mib < ROUND_GROWTH_MIB, (rss0 / mib, rss1 / mib, rss2 / mib)
        assert (rss2 - rss0) / mib < TOTAL_GROWTH_MIB, (rss0 / mib, rss1 / mib, rss2 / mib)
        assert server.get("/sdapi/v1/progress").json()["state"]["job"] == ""
        rss = ", ".join(f"{r / mib:.0f} MiB" for r in (rss0, rss1, rss2))
        print(f"\nload: round 1 {ok1} images + {full1} x 429, round 2 {ok2} + {full2}; server RSS {rss}")

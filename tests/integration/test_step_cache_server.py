"""The step cache through the live server: the `step_cache_threshold` request extension, the response's
`dit_forwards` extension and the Prometheus counter `diffserve_dit_forwards_total`."""

from __future__ import annotations

import httpx

STEPS = 10  # warm-up 6 + last 1 always computed (StepCacheConfig defaults): steps 6..8 may be reused


def generate(server, **extra) -> dict:
    r = httpx.post(
        f"{server.url}/v1/images/generations",
        headers=server.headers(),
        json={"prompt": "a red square", "size": "64x64", "seed": 7, "num_inference_steps": STEPS, **extra},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def counters(server) -> dict[str, float]:
    return {o: server.metric("diffserve_dit_forwards_total", outcome=o) for o in ("computed", "cached")}


def test_threshold_extension_reuses_and_counts(flux_server):
    before = counters(flux_server)
    plain = generate(flux_server)
    off = generate(flux_server, step_cache_threshold=0)
    # The tiny FLUX model is guidance-distilled: one DiT forward a step, all computed without the cache.
    assert plain["dit_forwards"] == {"computed": STEPS, "cached": 0}
    assert off["dit_forwards"] == plain["dit_forwards"]
    assert off["data"][0]["b64_json"] == plain["data"][0]["b64_json"]  # threshold 0 is the uncached path

    # Threshold 1 reuses every step the policy allows (a relative L1 change of the first block's output
    # under 100%): steps 6 and 7, then step 8 is computed (at most 2 reuses in a row), step 9 is the last.
    cached = generate(flux_server, step_cache_threshold=1.0)
    assert cached["dit_forwards"] == {"computed": STEPS - 2, "cached": 2}
    assert cached["data"][0]["b64_json"] != plain["data"][0]["b64_json"]

    after = counters(flux_server)
    assert after["computed"] - before["computed"] == 3 * STEPS - 2
    assert after["cached"] - before["cached"] == 2


def test_bad_threshold_is_a_400_naming_the_field(flux_server):
    for bad in (1.5, -0.1, "x"):
        r = httpx.post(
            f"{flux_server.url}/v1/images/generations",
            headers=flux_server.headers(),
            json={"prompt": "a red square", "size": "64x64", "step_cache_threshold": bad},
            timeout=30,
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "step_cache_threshold"

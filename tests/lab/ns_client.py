"""Run inside a lab host's namespace (the test itself cannot reach it): send
completions to the router there and print what came back, as JSON.

argv: base_url, then a JSON list of prompt-id lists; prints a list of token-id lists.
With a third argument `--until-ok` it waits for every worker to be back (status "ok",
not "degraded"), not only for the router to serve.
"""

import json
import sys
import time

import httpx

base_url, prompts = sys.argv[1], json.loads(sys.argv[2])
until_ok = sys.argv[3:] == ["--until-ok"]
deadline = time.monotonic() + 600
while True:  # the router answers /health once every worker is healthy
    try:
        health = httpx.get(f"{base_url}/health", timeout=2)
        if health.status_code == 200 and (not until_ok or health.json()["status"] == "ok"):
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit("router never became healthy")
    time.sleep(1)
outputs = []
for prompt in prompts:
    body = {"model": "hexserve-tiny-llama", "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=300)
    response.raise_for_status()
    outputs.append(response.json()["choices"][0]["token_ids"])
print(json.dumps(outputs))

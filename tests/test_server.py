"""End-to-end tests of the OpenAI-compatible vLLM API server with DSpark enabled."""

import json
import os
import shlex
import socket
import subprocess
import sys
import time

import pytest
import requests

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
PROMPT = "def main():"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _flags(draft, *extra):
    return subprocess.run([sys.executable, "-m", "dspark_vllm", "flags", draft, *extra],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def fixtures(fixture_paths):
    return fixture_paths


@pytest.fixture(scope="module")
def sps_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sps_cache")


@pytest.fixture(scope="module")
def server(fixtures, sps_cache, tmp_path_factory):
    """The API server with the sync policy (Algorithm 1): calibrated, cost profile measured at start.

    The break-even guard is off: these tests need every request to draft (the
    guard skips a random-weight drafter; tests/test_guard.py covers it).
    Prompt lookup is on, so greedy answers over HTTP also cover its route.
    """
    calibration = tmp_path_factory.mktemp("cal") / "calibration.json"
    calibration.write_text(json.dumps({"version": 1, "block_size": 7, "temperatures": [1.0] * 7}))
    res = _flags(fixtures["dspark"], "--verification", "sync", "--calibration", str(calibration),
                 "--sps-cache-dir", str(sps_cache), "--no-break-even", "--prompt-lookup")
    assert res.returncode == 0, res.stderr
    flags = shlex.split(res.stdout)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server_log") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", fixtures["target"],
           "--host", HOST, "--port", str(port), "--max-model-len", "512", "--dtype", "float32",
           "--enforce-eager", *flags]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    url = f"http://{HOST}:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after 240 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield {"url": url, "model": fixtures["target"]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _post(server, path, body):
    r = requests.post(server["url"] + path, json={"model": server["model"], **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(server, path, body):
    r = requests.post(server["url"] + path, json={"model": server["model"], "stream": True, **body},
                      stream=True, timeout=120)
    assert r.status_code == 200, r.text
    chunks = []
    for line in r.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        chunks.append(json.loads(data))
    return chunks


GREEDY = {"prompt": PROMPT, "max_tokens": 32, "temperature": 0, "ignore_eos": True}


def test_flags_reject_too_many_speculative_tokens(fixtures):
    res = _flags(fixtures["dspark"], "--num-speculative-tokens", "9")
    assert res.returncode == 2
    assert "block_size" in res.stderr


def _plain(baseline, max_tokens=32):
    """Plain decoding of PROMPT by an in-process engine with the server's settings."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return baseline.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text


def test_completion_equals_plain_decoding(server, baseline):
    out = _post(server, "/v1/completions", GREEDY)
    assert out["usage"]["completion_tokens"] == 32
    assert out["choices"][0]["text"] == _plain(baseline)


def test_completion_stream_equals_plain_decoding(server, baseline):
    chunks = _stream(server, "/v1/completions", GREEDY)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == _plain(baseline)


def test_chat_completion(server, baseline):
    from vllm import SamplingParams

    messages = [{"role": "user", "content": "hello"}]
    body = {"messages": messages, "temperature": 0, "max_tokens": 32}
    content = _post(server, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    chunks = _stream(server, "/v1/chat/completions", body)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    plain = baseline.chat(messages, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
    assert content == streamed == plain[0].outputs[0].text


def _counter(server, name):
    text = requests.get(server["url"] + "/metrics", timeout=30).text
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) == 2 and parts[0].split("{", 1)[0] == name:
            total += float(parts[1])
            found = True
    assert found, f"{name} not in /metrics"
    return total


def test_metrics_count_drafts(server):
    names = ["vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_drafts_total"]
    before = {n: _counter(server, n) for n in names}
    _post(server, "/v1/completions", GREEDY)
    after = {n: _counter(server, n) for n in names}
    for n in names:
        assert after[n] > before[n], (n, before[n], after[n])


def test_engine_cost_profile_is_measured_and_cached(server, sps_cache):
    from dspark_vllm.sps import load_profile

    [path] = list(sps_cache.glob("sps-*.json"))
    profile = load_profile(path)
    assert profile.table[0].tokens == 1 and profile.max_tokens >= 512
    assert all(p.sps > 0 for p in profile.table)


def test_dspark_metrics_on_the_metrics_endpoint(server):
    verified = [f"vllm:dspark_verified_tokens_total{{position=\"{k}\"}}" for k in range(1, 8)]

    def scrape():
        text = requests.get(server["url"] + "/metrics", timeout=30).text
        values = {}
        for line in text.splitlines():
            if not line.startswith("#") and " " in line:
                name, value = line.rsplit(None, 1)
                values[name] = float(value)
        return values

    before = scrape()
    _post(server, "/v1/completions", GREEDY)  # 32 greedy tokens: several drafting rounds, all verified
    after = scrape()
    assert after['vllm:dspark_policy_info{policy="sync"}'] == 1.0
    steps = "vllm:dspark_engine_steps_total"
    assert after[steps] > before.get(steps, 0)
    assert sum(after[v] for v in verified) > sum(before.get(v, 0) for v in verified)
    drafted = after['vllm:dspark_drafted_tokens_total{position="1"}']
    assert drafted > before.get('vllm:dspark_drafted_tokens_total{position="1"}', 0)
    assert drafted >= after['vllm:dspark_verified_tokens_total{position="1"}']
    assert after["vllm:dspark_verification_budget_tokens_count"] > 0
    assert "vllm:dspark_prompt_lookup_blocks_total" in after  # --prompt-lookup: greedy rows may take it
    # the calibration error is the counters' own gap, |predicted - accepted| / verified
    per_pos = lambda kind: [after[f"vllm:dspark_{kind}_tokens_total{{position=\"{k}\"}}"] for k in range(1, 8)]  # noqa: E731
    gap = sum(abs(p - a) for p, a in zip(per_pos("predicted_accepted"), per_pos("accepted")))
    assert after["vllm:dspark_calibration_error"] == pytest.approx(gap / sum(per_pos("verified")))

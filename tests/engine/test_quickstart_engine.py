"""``make run``'s command, ``paddler quickstart``, with its real engine and default model:
the console script, a balancer, one llama.cpp agent on SmolLM2, answered through the
real ``openai`` SDK, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.harness import REPO, free_port

pytestmark = pytest.mark.engine

PADDLER = Path(sys.executable).parent / "paddler"
"""The console script ``make run`` calls (``.venv/bin/paddler``)."""


def test_quickstart_serves_the_default_model_with_the_real_engine() -> None:
    inference, management, panel = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [
            str(PADDLER), "quickstart",
            "--inference-addr", f"127.0.0.1:{inference}",
            "--management-addr", f"127.0.0.1:{management}",
            "--web-admin-panel-addr", f"127.0.0.1:{panel}",
        ],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # the agent connected (the request below waits in the buffer while it loads)
            try:
                if httpx.get(f"http://127.0.0.1:{management}/api/v1/agents").json()["agents"]:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "quickstart exited"
            assert time.monotonic() < deadline, "quickstart's agent did not connect"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{inference}/v1", api_key="unused", timeout=120)
        reply = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.usage is not None
        assert reply.usage.completion_tokens > 0
        assert (reply.choices[0].message.content or "").strip(), reply
        agents = httpx.get(f"http://127.0.0.1:{management}/api/v1/agents").json()["agents"]
        assert agents[0]["slots_total"] == 4, agents

        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        output = process.stdout.read() if process.stdout else ""
        assert "SIMULATED" not in output
        assert "Paddler is up" in output, output[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

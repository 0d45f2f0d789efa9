"""``paddler quickstart`` starts a working stack and stops it cleanly on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx

from tests.harness import REPO, free_port


def test_quickstart_serves_requests_and_stops_on_ctrl_c() -> None:
    inference, management, panel = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "paddler_cli.main", "quickstart", "--engine", "simulated",
            "--inference-addr", f"127.0.0.1:{inference}",
            "--management-addr", f"127.0.0.1:{management}",
            "--web-admin-panel-addr", f"127.0.0.1:{panel}",
        ],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                agents = httpx.get(f"http://127.0.0.1:{management}/api/v1/agents").json()["agents"]
                if agents and agents[0]["slots_total"] == 4:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "quickstart did not come up"
            time.sleep(0.2)
        body = {"conversation_history": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        lines = httpx.post(
            f"http://127.0.0.1:{inference}/api/v1/continue_from_conversation_history", json=body, timeout=30
        ).text.splitlines()
        assert len(lines) == 4
        assert '"Done"' in lines[-1]
        assert httpx.get(f"http://127.0.0.1:{panel}/").status_code == 200

        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
        output = process.stdout.read() if process.stdout else ""
        assert "SIMULATED engine" in output
        assert "curl" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

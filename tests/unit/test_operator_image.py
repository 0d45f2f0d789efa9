"""The images' install steps run here, without Docker: Dockerfile.balancer calls
``scripts/image-install.sh balancer /opt/paddler``; this test runs the same command
into a temporary prefix and checks what an image would get."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "image-install.sh"


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def test_balancer_image_install(tmp_path: Path) -> None:
    prefix = tmp_path / "opt-paddler"
    env = {**os.environ, "PADDLER_PIP_CACHE": "1"}  # the image build uses --no-cache-dir
    proc = subprocess.run(
        ["bash", str(SCRIPT), "balancer", str(prefix)], capture_output=True, text=True, env=env, timeout=280
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    paddler = prefix / "bin" / "paddler"
    for sub in ("balancer", "operator"):
        help_text = subprocess.run([str(paddler), sub, "--help"], capture_output=True, text=True, check=True).stdout
        assert "--management-addr" in help_text or "--namespace" in help_text
    site = next((prefix / "lib").glob("python3*/site-packages"))
    assert (site / "kopf").is_dir()
    assert (site / "kubernetes_asyncio").is_dir()  # the operator's credentials (kubeconfig exec plugins too)
    assert not (site / "kubernetes").exists()  # the sync client is not needed beside it
    assert not (site / "llama_cpp").exists()  # only the agent image carries llama.cpp
    assert not (prefix / "bin" / "pip").exists()
    assert _size_mb(prefix) < 120, f"{_size_mb(prefix):.0f} MB"  # 44 MB of it kubernetes_asyncio


def test_dockerfiles_call_the_script() -> None:
    balancer = (REPO / "Dockerfile.balancer").read_text()
    agent = (REPO / "Dockerfile.agent").read_text()
    assert "scripts/image-install.sh balancer /opt/paddler" in balancer
    assert "image-install.sh agent /opt/paddler" in agent
    assert "image-install.sh llama-wheel" in agent
    for text in (balancer, agent):
        assert "USER 10001:10001" in text
    assert "-DGGML_NATIVE=OFF" in SCRIPT.read_text()
    assert "ARG GGML_CUDA=OFF" in agent


def test_dockerfiles_build_without_a_registry() -> None:
    """No BuildKit frontend image to pull, and the base is a build argument
    (`make images` passes a Debian base made here)."""
    for name in ("Dockerfile.balancer", "Dockerfile.agent", "Dockerfile.llama-server"):
        text = (REPO / name).read_text()
        assert "# syntax=" not in text, name
        assert "ARG BASE_IMAGE=" in text, name
        assert "FROM ${BASE_IMAGE}" in text, name
    model = (REPO / "Dockerfile.agent-model").read_text()
    assert "/models/SmolLM2-135M-Instruct.Q4_1.gguf" in model


def test_llama_server_image_installs_the_staged_binary_and_compiles_only_without_one() -> None:
    """`make images` stages the tests' cached llama-server (no second compile); a plain or
    CUDA build compiles it portable with the same script."""
    text = (REPO / "Dockerfile.llama-server").read_text()
    assert "/build-context/llama-server" in text
    assert '[ "$GGML_CUDA" != ON ]' in text
    assert "GGML_NATIVE=OFF" in text
    assert "scripts/install-llama-server.sh" in text
    assert "image-install.sh system-deps llama-server" in text
    assert "USER 10001:10001" in text
    images = (REPO / "scripts" / "images.sh").read_text()
    assert "scripts/install-llama-server.sh" in images

"""Rolling model swaps with real models: two llama agents behind a real balancer swap
from SmolLM2-135M (Q4_1) to Gemma-3-270M (Q4_K_M, scripts/fetch-second-model.sh)
under continuous load, with a buffer timeout shorter than a model swap."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Balancer, Processes
from tests.rolling import Load, ServingMonitor, agents, put_state, wait_for_rollout, wait_for_serving

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
AGENTS = 2
BUFFER_TIMEOUT_S = 0.1


@pytest.fixture(scope="module")
def second_model_path() -> Path:
    """Gemma 3 270M GGUF: another architecture, tokenizer and quantisation than SmolLM2."""
    script = ROOT / "scripts" / "fetch-second-model.sh"
    result = subprocess.run([str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"scripts/fetch-second-model.sh failed:\n{result.stderr}"
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file()
    return path


def greedy(path: str) -> dict[str, Any]:
    return {
        "model": {"LocalToAgent": path},
        "inference_parameters": {
            "temperature": 0.0,
            "penalty_repeat": 1.0,
            "penalty_presence": 0.0,
            "penalty_frequency": 0.0,
            "context_size": 512,
            "n_batch": 512,
        },
    }


@pytest.fixture
def pool(model_path: Path, tmp_path: Path) -> Iterator[tuple[Processes, Balancer]]:
    processes = Processes(tmp_path)
    try:
        balancer = processes.balancer(
            "--buffered-request-timeout", f"{int(BUFFER_TIMEOUT_S * 1000)}ms", "--max-unavailable", "1"
        )
        yield processes, balancer
    finally:
        processes.close()


async def start_serving(processes: Processes, balancer: Balancer, model: str) -> None:
    await put_state(balancer, greedy(model))
    for i in range(AGENTS):
        processes.agent(balancer, slots=2, name=f"llama-{i}", engine="llama", env={"PADDLER_THREADS": "1"})
    await wait_for_serving(balancer, AGENTS, model, timeout=120)


async def test_swap_to_another_real_model_under_load_fails_no_request(
    pool: tuple[Processes, Balancer], model_path: Path, second_model_path: Path
) -> None:
    processes, balancer = pool
    await start_serving(processes, balancer, str(model_path))

    async with Load(balancer, workers=2, max_tokens=6, prompt="The capital of France is") as load:
        async with ServingMonitor(balancer) as monitor:
            await load.wait_for_answers(4, timeout=60)
            before_put = len(load.outcomes)
            put_at = time.monotonic()
            await put_state(balancer, greedy(str(second_model_path)))
            await wait_for_rollout(balancer, "Complete", timeout=180)
            rollout_s = time.monotonic() - put_at
            after_done = len(load.outcomes)
        await load.wait_for_answers(4, timeout=60)

    assert [o for o in load.outcomes if not o.ok] == []
    assert monitor.fewest == AGENTS - 1
    old_text = load.outcomes[0].text
    new_text = load.outcomes[after_done].text
    assert new_text != old_text  # greedy: each model always gives its own answer
    assert load.outcomes[before_put - 1].text == old_text  # the last answer before the PUT
    assert {o.text for o in load.outcomes} == {old_text, new_text}
    assert all(o.text == new_text for o in load.outcomes[after_done:])
    assert rollout_s / AGENTS > BUFFER_TIMEOUT_S  # each switch outlasts the buffer timeout
    assert {a["model_path"] for a in await agents(balancer)} == {str(second_model_path)}


async def test_real_agent_that_cannot_load_the_model_stops_the_rollout(
    pool: tuple[Processes, Balancer], model_path: Path, tmp_path: Path
) -> None:
    processes, balancer = pool
    await start_serving(processes, balancer, str(model_path))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 4096)  # the magic, then garbage

    async with Load(balancer, workers=2, max_tokens=6, prompt="The capital of France is") as load:
        await load.wait_for_answers(4, timeout=60)
        await put_state(balancer, greedy(str(broken)))
        failed = await wait_for_rollout(balancer, "Failed", timeout=120)
        after_failure = len(load.outcomes)
        await load.wait_for_answers(6, timeout=60)

    assert [o for o in load.outcomes if not o.ok] == []
    assert failed["applied"] == 0
    assert "broken.gguf" in failed["message"]
    old_text = load.outcomes[0].text
    assert all(o.text == old_text for o in load.outcomes[after_failure:])
    found = await agents(balancer)
    assert {a["model_path"] for a in found} == {str(model_path)}
    assert sorted(a["state_application_status"] for a in found) == ["Applied", "AttemptedAndNotAppliable"]

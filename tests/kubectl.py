"""What the Kubernetes tiers (tests/k8s, tests/cluster) and bench/wake_up.py share:
``kubectl`` against one kubeconfig, and waiting for a condition with a deadline."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(probe: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``probe`` (every ``interval`` seconds) until it returns a truthy value; fail
    with ``what`` and the last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


@dataclass(frozen=True)
class Kubectl:
    """``kubectl`` bound to one kubeconfig."""

    kubeconfig: Path
    kubectl: Path

    @property
    def env(self) -> dict[str, str]:
        """Environment for child processes that talk to this cluster (kopf, helm, the operator)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl_run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl; with ``check``, a non-zero exit fails the test with kubectl's output."""
        proc = subprocess.run(
            [str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl_run("get", "-o", "json", *args).stdout)

    def pool_management_token(self, namespace: str, pool: str) -> str:
        """A pool's management token, read (as the test's admin) from the Secret the operator
        created for it: found by its labels, its name carries the pool's uid."""
        selector = f"paddler.dev/pool={pool},paddler.dev/component=management-token"
        found = self.get_json("-n", namespace, "secret", "-l", selector)["items"]
        assert len(found) == 1, f"{len(found)} management token Secrets of pool {pool}"
        return base64.b64decode(found[0]["data"]["management-token"]).decode()

    def apply(self, manifest: str, namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        self.kubectl_run(*ns, "apply", "-f", "-", input=manifest)

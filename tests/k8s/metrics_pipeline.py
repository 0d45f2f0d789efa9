"""The metrics pipeline of HPA mode for tests: Prometheus and prometheus-adapter as host processes.

Both are the project's scripts (``scripts/k8s/prometheus.sh``, ``scripts/k8s/prometheus-adapter.sh``;
``make metrics-up`` runs the same outside pytest). Use from a test module::

    from .metrics_pipeline import MetricsAdapter, Prometheus, metrics_adapter, prometheus  # noqa: F401

``prometheus`` (session): Debian's Prometheus on 127.0.0.1 and a free port, scraping once a second
every target a test gives it::

    prometheus.scrape("t1", balancer.management_addr, namespace=ns)   # a balancer's /metrics
    prometheus.wait_for_series('paddler_requests_buffered{namespace="..."}')
    prometheus.unscrape("t1")                                          # or let the test end

Targets added through ``scrape`` are removed when the test that added them ends (function-scoped
``prometheus_targets`` does it; ``prometheus.scrape`` alone keeps them for the session).

``metrics_adapter`` (module): prometheus-adapter registered as ``v1beta1.external.metrics.k8s.io``
of the test control plane with the chart's rules (``charts/paddler/files/prometheus-adapter-rules.yaml``,
rendered through Helm, so the test reads the rule users install), removed at the end of the module:
one external-metrics adapter per control plane at a time (KEDA's metrics server claims the same
APIService).
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kubectl import wait_until

from .conftest import K8sCluster

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "k8s"
CHART = REPO / "charts" / "paddler"
RULES_TEMPLATE = "templates/prometheus-adapter-rules.yaml"


@dataclass
class Prometheus:
    url: str
    directory: Path
    targets: set[str] = field(default_factory=set)

    def scrape(self, name: str, addr: str, **labels: str) -> None:
        """Scrape ``http://{addr}/metrics`` with these target labels (the adapter rule needs ``namespace``)."""
        pairs = [f"{k}={v}" for k, v in labels.items()]
        _script("prometheus.sh", "target", str(self.directory), name, addr, *pairs)
        self.targets.add(name)

    def unscrape(self, name: str) -> None:
        _script("prometheus.sh", "untarget", str(self.directory), name)
        self.targets.discard(name)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: ``[{"metric": {labels}, "value": [ts, "text"]}, ...]``."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for_series(self, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
        return wait_until(lambda: self.query(expr), timeout=timeout, what=f"Prometheus series {expr}")


def _script(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    proc = subprocess.run(
        ["bash", str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        raise AssertionError(f"scripts/k8s/{name} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    directory = tmp_path_factory.mktemp("prometheus")
    url = _script("prometheus.sh", "up", str(directory)).strip().splitlines()[-1]
    try:
        yield Prometheus(url=url, directory=directory)
    finally:
        _script("prometheus.sh", "down", str(directory), timeout=60)


@pytest.fixture
def prometheus_targets(prometheus: Prometheus) -> Iterator[Prometheus]:
    """``prometheus``, with the targets this test adds removed when it ends."""
    before = set(prometheus.targets)
    try:
        yield prometheus
    finally:
        for name in prometheus.targets - before:
            prometheus.unscrape(name)


def adapter_rules(cluster: K8sCluster) -> str:
    """The adapter's config as the chart renders it (values: prometheusAdapterRules.enabled)."""
    helm = cluster.helm or cluster.bin_dir / "helm"
    out = subprocess.run(
        # --kube-version: a helm built without its release ldflags (scripts/k8s/build.sh) takes
        # Kubernetes 1.20 by default, older than the chart's kubeVersion.
        [str(helm), "template", "rel", str(CHART), "--set", "prometheusAdapterRules.enabled=true",
         "--kube-version", "1.34.0", "--show-only", RULES_TEMPLATE],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    config_map = yaml.safe_load(out)
    text: str = config_map["data"]["config.yaml"]
    return text


@dataclass
class MetricsAdapter:
    cluster: K8sCluster
    directory: Path

    def external(self, namespace: str, metric: str, selector: str) -> list[float] | None:
        """Values the external metrics API serves (what the HPA controller reads), or None on an error."""
        path = f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{metric}"
        proc = self.cluster.kubectl_run(
            "get", "--raw", f"{path}?{urllib.parse.urlencode({'labelSelector': selector})}", check=False
        )
        if proc.returncode != 0:
            return None
        items = json.loads(proc.stdout)["items"]
        return [_quantity(i["value"]) for i in items]


def _quantity(text: str) -> float:
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    if text.endswith("k"):
        return float(text[:-1]) * 1000
    return float(text)


@pytest.fixture(scope="module")
def metrics_adapter(k8s_cluster: K8sCluster, prometheus: Prometheus) -> Iterator[MetricsAdapter]:
    directory = prometheus.directory
    config = directory / "prometheus-adapter-rules.yaml"
    config.write_text(adapter_rules(k8s_cluster))
    env = {**k8s_cluster.env, "PROMETHEUS_URL": prometheus.url, "ADAPTER_CONFIG": str(config)}
    _script("prometheus-adapter.sh", "up", str(directory), env=env)
    try:
        yield MetricsAdapter(cluster=k8s_cluster, directory=directory)
    finally:
        _script("prometheus-adapter.sh", "down", str(directory), env=env, timeout=120)


def wait_for_external(
    adapter: MetricsAdapter, namespace: str, metric: str, selector: str, *, at_least: float, timeout: float = 30
) -> list[float]:
    """Poll the external metrics API until one value of ``metric`` reaches ``at_least``."""

    def probe() -> list[float] | None:
        values = adapter.external(namespace, metric, selector)
        return values if values and max(values) >= at_least else None

    return wait_until(probe, timeout=timeout, what=f"external metric {metric}{{{selector}}} >= {at_least}")

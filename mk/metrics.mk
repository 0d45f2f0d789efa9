# Metrics pipeline for HPA mode (docs/scaling.md): Prometheus (Debian's package) and
# prometheus-adapter (built from the Go module proxy, cached under $(PADDLER_CACHE)),
# both as host processes beside the local control plane.
#   make metrics-up     control plane (k8s-up) + Prometheus + the adapter registered as
#                       v1beta1.external.metrics.k8s.io; state in .k8s/metrics/
#                       (scripts/k8s/prometheus.sh target .k8s/metrics NAME ADDR namespace=NS
#                       adds a balancer to scrape)
#   make metrics-down   stop both (k8s-down stops them too)
# The k8s tier's HPA tests (tests/k8s/test_autoscaling_hpa.py) start their own.
.PHONY: prometheus prometheus-adapter metrics-up metrics-down

## prometheus: apt-get install prometheus (once; the service is never started)
prometheus:
	bash scripts/k8s/prometheus.sh install

## prometheus-adapter: build (once) and cache sigs.k8s.io/prometheus-adapter
prometheus-adapter:
	bash scripts/k8s/prometheus-adapter.sh build

metrics-up: k8s-up prometheus prometheus-adapter
	bash scripts/k8s/prometheus.sh up
	bash scripts/k8s/prometheus-adapter.sh up

metrics-down:
	bash scripts/k8s/prometheus-adapter.sh down
	bash scripts/k8s/prometheus.sh down

INSTALL_TARGETS += prometheus prometheus-adapter

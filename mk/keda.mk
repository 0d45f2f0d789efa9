# KEDA (operator + metrics apiserver) from the Go module proxy, for the KEDA
# autoscaling tier (tests/k8s/test_autoscaling_keda.py) and for measuring the
# KEDA mode's wake-up by hand. Built once and cached under
# $(PADDLER_CACHE)/keda/<version>/ (scripts/k8s/keda-build.sh); `make install`
# (and so `make test`) builds it up front: the cold build compiles every KEDA
# scaler and would not fit a test's timeout.
INSTALL_TARGETS += keda-build

.PHONY: keda-build keda-up keda-down

## keda-build: build (once) and cache keda-operator, keda-adapter and KEDA's CRDs
keda-build:
	nice -n 10 bash $(K8S_SCRIPTS)/keda-build.sh

## keda-up: start the control plane (k8s-up) and KEDA on it as host processes; registers external.metrics.k8s.io
keda-up: k8s-up keda-build
	bash $(K8S_SCRIPTS)/keda-up.sh

## keda-down: stop KEDA and remove its APIService (the control plane keeps running)
keda-down:
	bash $(K8S_SCRIPTS)/keda-down.sh

# Real local Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kwok fake nodes), plus kubectl and
# helm, built from source once and cached under $(PADDLER_CACHE)/k8s/; see
# scripts/k8s/*.sh. Included by the main Makefile. `make install` (and so
# `make test`) builds the binaries up front: a cold build takes tens of
# minutes, which would not fit a test's timeout.
K8S_SCRIPTS := scripts/k8s

INSTALL_TARGETS += k8s-build

.PHONY: k8s-build k8s-up k8s-down

## k8s-build: build (once) and cache the control-plane binaries, kubectl, kwok, helm
k8s-build:
	bash $(K8S_SCRIPTS)/build.sh

## k8s-up: start the local control plane; writes .k8s/kubeconfig
k8s-up: k8s-build
	bash $(K8S_SCRIPTS)/up.sh

## k8s-down: stop the local control plane and drop its etcd data
k8s-down:
	bash $(K8S_SCRIPTS)/down.sh

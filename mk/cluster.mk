# Container images and a real single-node cluster (docs/development.md, "Cluster tier").
#   make images        Docker images of Dockerfile.{balancer,agent,agent-model,llama-server};
#                      tags are the chart's and the operator's defaults (IMAGE_TAG=... to change)
#   make cluster-up    control plane (scripts/k8s/up.sh) + a real node (containerd, CNI,
#                      kubelet, kube-proxy, CoreDNS) with the images loaded;
#                      KUBECONFIG=.k8s/cluster/kubeconfig, .k8s/cluster/bin/{kubectl,helm}
#   make cluster-down  stop all of it (and the Docker daemon if the project started it)
# The tier tests/cluster (marker `cluster`, part of `make test`) runs these itself.
.PHONY: docker-up docker-down llama-wheel-portable images cluster-up cluster-down

CLUSTER_DIR ?= $(CURDIR)/.k8s/cluster

docker-up:
	bash scripts/docker.sh up

docker-down:
	bash scripts/docker.sh down

## llama-wheel-portable: the agent image's llama.cpp (GGML_NATIVE=OFF), compiled once, cached
llama-wheel-portable:
	nice -n 10 scripts/llama-wheel-portable.sh >/dev/null

## images: balancer, agent, agent+SmolLM2, llama-server and llama-server+SmolLM2 images
## (BASE_IMAGE=... for a public base); llama-server is the tests' cached binary, not a compile
images: docker-up llama-wheel-portable model llama-server
	bash scripts/images.sh all

cluster-up: k8s-build images
	PADDLER_K8S_DIR=$(CLUSTER_DIR) bash scripts/k8s/cluster-up.sh

cluster-down:
	PADDLER_K8S_DIR=$(CLUSTER_DIR) bash scripts/k8s/cluster-down.sh

# Slow, cacheable steps run at install time (no Docker needed): the wheel.
INSTALL_TARGETS += llama-wheel-portable

# Operator: CRDs generated from the pydantic models, container images, and the
# kind end-to-end suite (needs Docker + kind; not part of `make test`).
.PHONY: crds crds-check images image-balancer image-agent e2e-kind e2e-kind-down

E2E_IMAGE_TAG ?= e2e
KIND ?= kind
DOCKER ?= docker
KIND_CLUSTER ?= paddler-e2e
AGENT_BUILD_ARGS ?=

## crds: regenerate crds/ and charts/paddler/crds/ from operator/paddler_operator/crd_models.py
crds: venv
	$(PY) -m paddler_operator.gen_crds

## crds-check: fail if crds/ is stale (also a unit test)
crds-check: venv
	$(PY) -m paddler_operator.gen_crds --check

image-balancer:
	$(DOCKER) build -f Dockerfile.balancer -t paddler-balancer:$(E2E_IMAGE_TAG) .

## image-agent: CPU by default; AGENT_BUILD_ARGS="--build-arg GGML_CUDA=ON ..." for CUDA (see Dockerfile.agent)
image-agent:
	$(DOCKER) build -f Dockerfile.agent $(AGENT_BUILD_ARGS) -t paddler-agent:$(E2E_IMAGE_TAG) .

images: image-balancer image-agent

## e2e-kind: build images, load them into a kind cluster, helm install, serve a real model (Docker only)
e2e-kind: venv images
	@command -v $(KIND) >/dev/null || { echo "e2e-kind needs kind (https://kind.sigs.k8s.io) and Docker" >&2; exit 1; }
	PADDLER_E2E_KIND=$(KIND) PADDLER_E2E_CLUSTER=$(KIND_CLUSTER) PADDLER_E2E_TAG=$(E2E_IMAGE_TAG) \
		$(PY) -m pytest -m e2e tests/e2e $(PYTEST_ARGS)

e2e-kind-down:
	$(KIND) delete cluster --name $(KIND_CLUSTER)

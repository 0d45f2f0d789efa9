# Operator: CRDs generated from the pydantic models. Container images and the
# real single-node cluster they run on are in mk/cluster.mk.
.PHONY: crds crds-check

## crds: regenerate crds/ and charts/paddler/templates/crds/ from operator/paddler_operator/crd_models.py
crds: venv
	$(PY) -m paddler_operator.gen_crds

## crds-check: fail if a generated CRD is stale (also a unit test)
crds-check: venv
	$(PY) -m paddler_operator.gen_crds --check

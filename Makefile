# The two commands of the README. Both set everything up first (scripts/setup.sh) and are idempotent.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint
setup:
	@bash scripts/setup.sh

# train a nested model on the built-in data (mnist5k), show progress, test accuracy, checkpoint and plots;
# each run gets its own folder runs/mnist5k_nest-<date>-<time>, so repeating it never collides
demo: setup
	$(BIN)/nestvit train mnist5k_nest

# the default test suite (under 10 minutes on 2 cores)
test: setup
	$(BIN)/python -m pytest -n 2 --durations=15

# style check (ruff); kept apart from `make test` so CI judges behaviour
lint: setup
	$(BIN)/ruff check src tests experiments

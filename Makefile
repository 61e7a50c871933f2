.PHONY: setup test test-latest lint format docs demo

setup:
	bash scripts/setup.sh

test:
	.venv/bin/python -m pytest -q

# The whole suite on the newest versions pyproject.toml allows (CI runs only the unit tier and the compat tests
# there): run it whenever constraints/lock.txt or a range in pyproject.toml changes.
test-latest:
	KOTUNE_DEPS=latest KOTUNE_VENV=.venv-latest bash scripts/setup.sh
	.venv-latest/bin/python -m pytest -q

lint:
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench

format:
	.venv/bin/ruff format src tests bench

docs:
	.venv/bin/python -m kotune.docs README.md

demo:
	.venv/bin/kotune train examples/ko-demo.yaml

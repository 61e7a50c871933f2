.PHONY: setup test lint format docs demo

setup:
	bash scripts/setup.sh

test:
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench

format:
	.venv/bin/ruff format src tests bench

docs:
	.venv/bin/python -m kotune.docs README.md

demo:
	.venv/bin/kotune train examples/ko-demo.yaml

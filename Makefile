.PHONY: setup test lint format docs demo

setup:
	bash scripts/setup.sh

test:
	python3 -m pytest -q

lint:
	ruff check src tests bench
	ruff format --check src tests bench

format:
	ruff format src tests bench

docs:
	python3 -m kotune.docs README.md

demo:
	kotune train examples/ko-demo.yaml

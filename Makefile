.PHONY: test reliability lint

test:
	python -m pytest -q

# Slow reliability harnesses (crash safety, full damage fuzz, concurrency); see docs/reliability.md
reliability:
	python -m pytest -q -m slow tests/test_reliability_slow.py

lint:
	ruff check . && ruff format --check .

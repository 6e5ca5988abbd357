.PHONY: test reliability test-ray lint

test:
	python -m pytest -q

# Slow reliability harnesses (SIGKILL crash safety, power loss, full damage fuzz, concurrency,
# readers under writes, CLI repair); see docs/reliability.md
reliability:
	python -m pytest -q -m slow tests/test_reliability_slow.py tests/test_repair.py

# The Ray engine against the local one on a local 2-CPU Ray instance (pip install -e '.[ray]')
test-ray:
	RAY_USAGE_STATS_ENABLED=0 python -m pytest -q -m slow tests/test_ray.py

lint:
	ruff check . && ruff format --check .

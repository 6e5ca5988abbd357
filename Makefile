.PHONY: test reliability test-ray test-serve lint docs

test:
	python -m pytest -q

# Slow reliability harnesses (SIGKILL crash safety, power loss, full damage fuzz, concurrency,
# readers under writes, CLI repair); see docs/reliability.md
reliability:
	python -m pytest -q -m slow tests/test_reliability_slow.py tests/test_repair.py

# The Ray engine against the local one on a local 2-CPU Ray instance (pip install -e '.[ray]')
test-ray:
	RAY_USAGE_STATS_ENABLED=0 python -m pytest -q -m slow tests/test_ray.py

# reasonedit serve under load (8 clients x 50 requests) and as real processes
test-serve:
	python -m pytest -q -m slow tests/test_serve_slow.py

# ruff, then mypy with the [tool.mypy] settings of pyproject.toml (the whole package)
lint:
	ruff check . && ruff format --check . && mypy

# Regenerate docs/cli.md from the --help of every command (tests/test_cli_docs.py checks it)
docs:
	python scripts/gen_cli_docs.py

.PHONY: demo lint test
demo:  ## set up .venv and run the offline demo on a local Dask cluster
	scripts/demo.sh
lint:  ## set up .venv, then ruff (lint, import order, formatting) and mypy
	scripts/lint.sh
test:  ## set up .venv and run the tests
	scripts/test.sh

.PHONY: demo test
demo:  ## set up .venv and run the offline demo on a local Dask cluster
	scripts/demo.sh
test:  ## set up .venv and run the tests
	scripts/test.sh

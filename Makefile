# The two commands of the README. Each does all set-up on a fresh machine itself.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test clean

setup:
	@bash scripts/setup.sh

# corpus -> teacher -> speech -> features
demo: setup
	$(PY) -m pipeline.samples
	$(PY) -m pipeline.toy_teacher
	$(PY) -m pipeline.speech
	$(PY) -m pipeline.features

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf data/samples data/audio data/features data/models data/cache data/rejects data/raw

# The two commands of the README. Each does all set-up on a fresh machine itself.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false
DEMO_STUDENT_STEPS ?= 200
DEMO_ALIGN_STEPS ?= 100

.PHONY: setup demo test clean

setup:
	@bash scripts/setup.sh

# The Prefect flow cache-teacher on the embedded default:
# toy world -> toy teacher -> speech -> features -> teacher logit cache (data/cache),
# then a short student training from that cache and its evaluation.
demo: setup
	$(PY) flows/cache_teacher.py
	$(PY) student/train.py --logits data/cache --steps $(DEMO_STUDENT_STEPS) --align-steps $(DEMO_ALIGN_STEPS) --eval-every 0

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf data/samples data/audio data/features data/models data/cache data/rejects data/raw data/bench

# The two commands of the README. Each does all set-up on a fresh machine itself.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false
# The demo student's recipe is configs/demo.toml; DEMO_ARGS adds or overrides options (e.g. DEMO_ARGS="--steps 100").
DEMO_ARGS ?=

.PHONY: setup demo test test-fast clean

setup:
	@bash scripts/setup.sh

# The Prefect flow cache-teacher on the embedded default:
# toy world -> toy teacher -> speech -> features -> teacher logit cache (data/cache) -> toy speech encoder,
# then a short student training from that cache and its evaluation, and the same student on the toy eval split
# exported as a VoiceBench-format benchmark (the path a saved VoiceBench takes: docs/evaluation.md).
demo: setup
	$(PY) flows/cache_teacher.py
	$(PY) student/train.py --config configs/demo.toml $(DEMO_ARGS)
	$(PY) -m toy.world --export-benchmark data/benchmark
	$(PY) -m student.bench_eval --config configs/demo_benchmark.toml

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick loop while editing: every test that starts no vLLM engine, Prefect server or Ray cluster (< 2 min).
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf data/samples data/audio data/features data/audio-heldout-voice data/features-heldout-voice \
		data/audio-heldout-tts data/features-heldout-tts data/models \
		data/cache data/rejects data/raw data/bench data/runs data/benchmark

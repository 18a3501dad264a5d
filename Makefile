# The two commands of the README. Each does all set-up on a fresh machine itself.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false
DEMO_STUDENT_STEPS ?= 860
DEMO_ALIGN_STEPS ?= 800
# The demo student starts from the flow's pretrained toy encoder (the toy Whisper), reads it through the
# LegoSLM-style ctc-embed interface, aligns it by token CTC, then fine-tunes with both KD channels
# (the speech side at a tenth of its alignment lr: at 2e-3 fine-tuning undid the alignment).
DEMO_STUDENT_FLAGS ?= --encoder data/models/encoder --adapter ctc-embed --align ctc --no-freeze-encoder --lr 2e-3 \
	--finetune-lr 2e-4

.PHONY: setup demo test clean

setup:
	@bash scripts/setup.sh

# The Prefect flow cache-teacher on the embedded default:
# toy world -> toy teacher -> speech -> features -> teacher logit cache (data/cache) -> toy speech encoder,
# then a short student training from that cache and its evaluation.
demo: setup
	$(PY) flows/cache_teacher.py
	$(PY) student/train.py --logits data/cache $(DEMO_STUDENT_FLAGS) --steps $(DEMO_STUDENT_STEPS) \
		--align-steps $(DEMO_ALIGN_STEPS) --eval-every 0

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf data/samples data/audio data/features data/audio-heldout-voice data/features-heldout-voice \
		data/audio-heldout-tts data/features-heldout-tts data/models \
		data/cache data/rejects data/raw data/bench

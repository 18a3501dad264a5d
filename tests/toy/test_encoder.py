"""The embedded speech encoder: its corpus never contains a world word, its CTC targets are espeak-ng's phonemes of
the text whoever speaks, its clips are spoken by more than one synthesizer and perturbed reproducibly, its build
report lists what it heard and measures what it never heard, and the student starts from it (frozen by default)."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

from toy import encoder as te

VOICES = ("en-us", "en+f2", "festival:ked_diphone", "festival:cmu_us_slt_arctic_hts")
TINY = te.EncoderBuildConfig(utterances=48, eval_utterances=8, heldout_names=8, n_mels=40, max_minutes=0.02,
                             eval_every=2, batch_size=8, voices=VOICES)  # fmt: skip


def test_pseudo_names_avoid_every_world_word_and_carrier_sentences_use_them(tiny_rows):
    words = te._words([r["prompt"] for r in tiny_rows] + [r["response"] for r in tiny_rows])
    names = te.pseudo_names(random.Random(0), 500, words)
    assert len(set(names)) == 500 and not {n.lower() for n in names} & words
    rng = random.Random(1)
    sentences = [te.carrier_sentence(rng, names) for _ in range(200)]
    capitalised = {w for s in sentences for w in re.findall(r"[A-Z][a-z]+", s)}
    assert len(capitalised & set(names)) > 50  # the slots hold pseudo-names
    # no name of the world is ever spoken in the corpus
    world_names = {w.lower() for r in tiny_rows for w in re.findall(r"[A-Z][a-z]+", r["prompt"] + " " + r["response"])}
    template_words = te._words([c for rel in te.RELATIONS + (te.ADDITION,) for c in rel.prompts + (rel.answer,)])
    assert not (world_names - template_words) & {w.lower() for w in capitalised}


def test_pretraining_names_never_sound_like_a_world_word_or_each_other(tiny_rows):
    from toy.world import phonemize

    words = te._words([r["prompt"] for r in tiny_rows] + [r["response"] for r in tiny_rows])
    names = te.pretraining_names(random.Random(0), 400, words)
    sounds = phonemize(names)
    assert len(names) == 400 and len(set(sounds)) == 400  # no two alike
    assert not set(sounds) & set(phonemize(sorted(words)))  # none sounds like a word of the world
    # the filter is needed: raw pseudo-names do collide in sound
    raw = te.pseudo_names(random.Random(0), 3000, words)
    assert len(set(phonemize(raw))) < len(raw)


def test_ctc_targets_are_espeak_phonemes_of_the_text_in_one_inventory():
    import subprocess

    text = "What is the capital of Bakitan?"
    phonemes = te.phoneme_targets([text])[0]
    assert phonemes.count("|") == 5  # six words
    assert not any("'" in p or "," in p for p in phonemes)  # stress marks dropped
    raw = subprocess.run(["espeak-ng", "-q", "-x", "--sep=_", "-v", "en-us"], input=text.encode(),
                         capture_output=True, check=True).stdout.decode()  # fmt: skip
    expected = [p.replace("'", "").replace(",", "") for w in raw.split() for p in w.split("_") + ["|"]][:-1]
    assert phonemes == [p for p in expected if p]
    # one espeak-ng call for many texts gives each its own phonemes, in order
    texts = [text, "The capital of Romiland is Sefa.", "What is 3 plus 14?", "Who founded Kelvora?"]
    assert te.phoneme_targets(texts) == [te.phoneme_targets([t])[0] for t in texts]
    assert te.phoneme_targets(texts)[0] != te.phoneme_targets(texts)[1]


def test_perturbation_is_seeded_the_same_corpus_and_seed_give_the_same_features():
    """Every clip's perturbation (speed, VTLP, noise, room, dither) is drawn from (seed, its key): building the same
    clips twice, in another order, gives the same features; another seed other features."""
    from pipeline.speech import make_backend

    backend = make_backend("espeak-ng+festival")
    cfg = te.EncoderBuildConfig(clean_fraction=0.0, noise_p=1.0, room_p=1.0)
    clips = te.corpus_clips(cfg, random.Random(0), ["Zorbania", "Melvik"], VOICES, 6, "t-", perturbed=True)
    assert all(c.perturbation.snr_db is not None and c.perturbation.rt60_s is not None for c in clips)
    assert len({c.voice for c in clips}) > 1
    a = te.synthesize_corpus(clips, backend, 40, 0, False, "a")
    b = te.synthesize_corpus(clips[::-1], backend, 40, 0, False, "b")[::-1]
    c = te.synthesize_corpus(clips, backend, 40, 1, False, "c")
    clean = te.synthesize_corpus([te.Clip(x.text, x.voice, x.rate) for x in clips], backend, 40, 0, False, "d")
    for (fa, pa), (fb, pb), (fc, _), (fd, pd) in zip(a, b, c, clean):
        assert np.array_equal(fa, fb) and pa == pb == pd  # the targets do not depend on the perturbation
        assert not np.array_equal(fa, fc)
        assert fa.shape != fd.shape or not np.array_equal(fa, fd)


def test_a_held_out_synthesizer_cannot_be_a_corpus_synthesizer():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="--heldout-tts festival is one of the corpus's synthesizers"):
        te.EncoderBuildConfig(tts="espeak-ng+festival", heldout_tts="festival")
    assert te.EncoderBuildConfig(tts="espeak-ng+flite", heldout_tts="festival").synthesizers() == ("espeak-ng",
                                                                                                   "flite")


def test_a_tiny_budget_build_reports_what_it_heard_and_what_it_never_heard(built_encoder):
    from pipeline import conditions
    from pipeline.speech import Flite
    from student.model import pretrained_toy_encoder

    assert te.is_built(built_encoder)
    report = json.loads((built_encoder / te.BUILD_REPORT).read_text())
    assert 0.0 <= report["heldout_per"] and report["steps"] >= 2 and report["phonemes"] > 20
    assert report["history"] and report["history"][-1]["step"] == report["steps"]
    # what it heard: the two synthesizers, only the configured voices, the perturbations
    assert report["synthesizers"] == ["espeak-ng", "festival"]
    assert set(report["voices_heard"]) <= set(VOICES) and report["voices"] == len(report["voices_heard"]) > 1
    aug = report["augmentation"]
    assert aug["noise_type"] == "white" and aug["perturbed_clips"] > 0 and aug["spec_augment"]
    # what it never heard, each measured: en-029, every voice of Flite, every held-out condition
    assert report["heldout_voice"] == "en-029" and report["heldout_voice"] not in report["voices_heard"]
    assert report["heldout_tts"] == "flite" and "flite" not in report["synthesizers"]
    assert {f"tts:flite:{v}" for v in Flite.default_voices} <= set(report["per"])
    assert {f"condition:{c}" for c in conditions.CONDITIONS} <= set(report["per"])
    assert report["heldout_conditions"] == list(conditions.CONDITIONS)
    assert all(0.0 <= v for v in report["per"].values())
    assert "flite" in te.never_heard_summary(report) and "telephone" in te.never_heard_summary(report)
    assert pretrained_toy_encoder(str(built_encoder))["config"]["feature_norm"] == "utterance"
    before = (built_encoder / te.WEIGHTS_FILE).stat().st_mtime_ns
    assert te.main(["--out", str(built_encoder)]) == 0  # a complete build is skipped
    assert (built_encoder / te.WEIGHTS_FILE).stat().st_mtime_ns == before


def test_the_flow_refuses_a_held_out_synthesizer_the_built_encoder_heard(built_encoder):
    from flows.cache_teacher import check_encoder_never_heard
    from pipeline.config import ConfigError

    check_encoder_never_heard(built_encoder, "flite")  # never heard: fine
    with pytest.raises(ConfigError, match="--heldout-tts festival: the toy encoder at .* heard it in pretraining"):
        check_encoder_never_heard(built_encoder, "festival")


@pytest.fixture(scope="module")
def built_encoder(samples_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "encoder"
    te.build_encoder(samples_dir, out, TINY, progress=False)
    return out


def test_student_loads_the_built_encoder_frozen_and_aligns_by_behaviour(built_encoder, tiny_teacher, tmp_path,
                                                                        student_cache):  # fmt: skip
    import csv

    from student.model import SpeechLLM, StudentConfig
    from student.train import TrainConfig, train

    model = SpeechLLM(StudentConfig(backbone=str(tiny_teacher), encoder=str(built_encoder), n_mels=40))
    saved = torch.load(built_encoder / te.WEIGHTS_FILE, weights_only=True)["encoder"]
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert model.encoder.subsample.layers == 2  # 40 ms frames, as built

    cfg = TrainConfig(logits=str(student_cache), out=str(tmp_path / "run"), encoder=str(built_encoder), align="behave",
                      steps=4, align_steps=2, batch_size=4, eval_every=0, save_every=4, num_workers=0, warmup=1,
                      final_eval=False)  # fmt: skip
    train(cfg, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert rows[0]["kd_S"] and rows[0]["ce_S"] and not rows[0]["align"]  # behaviour alignment
    assert float(rows[0]["lr_backbone"]) == 0.0  # the backbone stays frozen while aligning
    from student.checkpoint import model_state

    state = model_state(tmp_path / "run")
    for key, value in saved.items():  # frozen by default: the encoder is still the built one
        assert torch.equal(state["encoder." + key], value), key


def test_ctc_embed_adapter_gives_one_token_embedding_per_ctc_emission(tiny_teacher):
    """LegoSLM-style interface: with confident CTC posteriors the backbone reads exactly the token embeddings
    of what CTC emits (repeats collapsed, blanks dropped), and gradients reach the CTC head."""
    from student.model import SpeechLLM, StudentConfig

    model = SpeechLLM(StudentConfig(backbone=str(tiny_teacher), n_mels=40, adapter="ctc-embed"))
    V = model.embed.weight.shape[0]
    blank = V
    frames = [7, 7, blank, 9, blank, blank, 9, 3]  # CTC emits 7, 9, 9, 3
    x = torch.zeros(1, len(frames), model.encoder.out_dim)
    with torch.no_grad():
        model.ctc_head.weight.zero_()
        model.ctc_head.bias.zero_()
        for t, k in enumerate(frames):  # make frame t's posterior one-hot on token k via its own input unit
            x[0, t, t] = 1.0
            model.ctc_head.weight[k, t] = 60.0
    emb, lengths = model._ctc_embeddings(x, torch.tensor([len(frames)]))
    assert lengths.tolist() == [4]
    expected = model.embed.weight[torch.tensor([7, 9, 9, 3])]
    torch.testing.assert_close(emb[0, :4], expected, atol=1e-4, rtol=1e-4)
    emb.sum().backward()
    assert model.ctc_head.weight.grad is not None and model.ctc_head.weight.requires_grad


def test_ctc_alignment_trains_the_speech_side_alone_and_ctc_stays_on_in_fine_tuning(built_encoder, student_cache,
                                                                                    tmp_path):  # fmt: skip
    """--align ctc: token CTC of the encoder frames only (the backbone is not run, its lr is 0); with the
    ctc-embed interface token CTC stays on while fine-tuning, at --finetune-lr on the speech side."""
    import csv

    from student.train import TrainConfig, train

    cfg = TrainConfig(logits=str(student_cache), out=str(tmp_path / "run"), encoder=str(built_encoder), align="ctc",
                      adapter="ctc-embed", freeze_encoder=False, steps=5, align_steps=3, batch_size=4, eval_every=0,
                      save_every=3, num_workers=0, warmup=1, final_eval=False, lr=1e-3,
                      finetune_lr=1e-5)  # fmt: skip
    before = torch.load(built_encoder / te.WEIGHTS_FILE, weights_only=True)["encoder"]
    train(cfg, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    aligning, tuning = rows[:3], rows[3:]
    assert all(r["ctc"] and not r["kd_S"] and not r["ce_S"] and not r["align"] for r in aligning)
    assert all(float(r["lr_backbone"]) == 0.0 for r in aligning)
    assert all(r["ctc"] and r["kd_S"] and r["kd_T"] for r in tuning)
    assert float(tuning[0]["lr_speech"]) == pytest.approx(1e-5)  # --finetune-lr (warm-up of 1 step)
    from student.checkpoint import model_state

    state = model_state(tmp_path / "run")
    assert any(not torch.equal(state["encoder." + k], v) for k, v in before.items())  # --no-freeze-encoder: trained
    with pytest.raises(Exception, match="--ctc-weight"):
        TrainConfig(logits=str(student_cache), align="ctc", ctc_weight=0.0).validate()


def test_a_saved_student_loads_from_its_own_directory_with_the_encoder_directory_gone(built_encoder, student_cache,
                                                                                     tmp_path):  # fmt: skip
    """final/ is self-contained: the encoder's architecture is in student_config.json, its (trained) weights in
    speech.pt; nothing is read from the directory the encoder was built in."""
    import shutil

    from student.data import pad_speech
    from student.model import SpeechLLM
    from student.train import TrainConfig, train

    encoder = tmp_path / "encoder"
    shutil.copytree(built_encoder, encoder)
    cfg = TrainConfig(logits=str(student_cache), out=str(tmp_path / "run"), encoder=str(encoder), align="ctc",
                      adapter="ctc-embed", freeze_encoder=False, steps=3, align_steps=2, batch_size=4, eval_every=0,
                      num_workers=0, warmup=1, final_eval=False)  # fmt: skip
    train(cfg, progress=False)
    trained = SpeechLLM.load(tmp_path / "run" / "final").eval()
    shutil.rmtree(encoder)  # the encoder's own directory is gone
    again = SpeechLLM.load(tmp_path / "run" / "final").eval()
    clips = pad_speech([torch.randn(80, 40).numpy(), torch.randn(50, 40).numpy()])
    with torch.no_grad():
        a = trained.speech_embeddings(clips["speech"], clips["speech_lengths"])
        b = again.speech_embeddings(clips["speech"], clips["speech_lengths"])
    torch.testing.assert_close(a[0], b[0])
    assert a[1].tolist() == b[1].tolist()
    built = torch.load(built_encoder / te.WEIGHTS_FILE, weights_only=True)["encoder"]
    assert any(not torch.equal(again.encoder.state_dict()[k], v) for k, v in built.items())  # the trained weights

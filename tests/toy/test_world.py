import json

from toy import world as toy_world
from toy.world import ToyWorldConfig, generate


def test_generator_is_deterministic():
    a = generate(ToyWorldConfig(n_entities=10, n_additions=5, seed=3))
    b = generate(ToyWorldConfig(n_entities=10, n_additions=5, seed=3))
    assert json.dumps(a) == json.dumps(b)
    c = generate(ToyWorldConfig(n_entities=10, n_additions=5, seed=4))
    assert json.dumps(a) != json.dumps(c)


def test_eval_templates_are_disjoint_from_train():
    rows = generate(ToyWorldConfig(n_entities=20, n_additions=10, seed=0))
    by_split = {"train": set(), "eval": set()}
    for r in rows:
        by_split[r["split"]].add((r["meta"]["relation"], r["meta"]["template"]))
    assert by_split["train"] and by_split["eval"]
    assert not by_split["train"] & by_split["eval"]
    # The texts differ too, not only the template numbers.
    for rel in toy_world.RELATIONS + (toy_world.ADDITION,):
        assert not set(rel.train_prompts) & set(rel.eval_prompts)
        assert rel.eval_prompts


def test_every_eval_fact_is_taught_in_train():
    rows = generate(ToyWorldConfig(n_entities=15, n_additions=10, seed=0))
    train_facts = {(r["meta"]["entity"], r["meta"]["relation"], r["response"]) for r in rows if r["split"] == "train"}
    eval_facts = {(r["meta"]["entity"], r["meta"]["relation"], r["response"]) for r in rows if r["split"] == "eval"}
    assert eval_facts <= train_facts
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids))


def test_default_size_is_a_few_thousand():
    rows = generate()
    assert 2000 <= len(rows) <= 5000


def test_no_two_names_of_the_world_sound_alike():
    rows = generate()
    names = set()
    for r in rows:
        if r["meta"]["relation"] == "addition":
            continue
        names.add(r["meta"]["entity"])
        if r["meta"]["relation"] in ("capital", "founder"):
            names.add(r["meta"]["answer"])
    names = sorted(names)
    assert len(names) == 180  # 60 countries, 60 capitals, 60 founders
    assert len(set(toy_world.phonemize(names))) == len(names)


def test_a_name_that_sounds_like_a_used_one_is_drawn_again():
    import random

    sounds = {toy_world.phonemize(["Pirland"])[0]}
    offered = iter(["Perland", "Purland", "Doran"])  # the first two sound like Pirland to espeak-ng
    assert toy_world._unique(random.Random(0), lambda r: next(offered), set(), sounds) == "Doran"

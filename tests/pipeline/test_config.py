"""One config style: every command's flags come from dataclasses, a TOML recipe sets any of them (flags override it,
--help shows the result), a run's config writes back as a recipe; and the import graph has no cycle."""

from __future__ import annotations

import importlib
import importlib.util
import tomllib
from dataclasses import replace

import pytest

from pipeline.config import ConfigError, dump_toml, load_config_file, parse_args, parse_config
from student.config import EvalConfig, TrainConfig
from tests.helpers import REPO, one_line_error, run

ENTRY_POINTS = {  # [project.scripts] name -> module:function (every stage, the flow, the student, the fixtures)
    "speechkd-samples": "pipeline.samples:main", "speechkd-speech": "pipeline.speech:main",
    "speechkd-features": "pipeline.features:main", "speechkd-teacher": "pipeline.teacher:main",
    "speechkd-query": "pipeline.query:main", "speechkd-flow": "flows.cache_teacher:main",
    "speechkd-train": "student.train:main", "speechkd-evaluate": "student.evaluate:main",
    "speechkd-toy-world": "toy.world:main", "speechkd-toy-teacher": "toy.teacher:main",
    "speechkd-toy-encoder": "toy.encoder:main", "speechkd-toy-speech-llm": "toy.speech_llm:main",
    "speechkd-bench-eval": "student.bench_eval:main",
}  # fmt: skip
BENCHES = ("cache_throughput", "cache_scaling", "draws_devices", "paper_table", "student_data", "targets_quality",
           "teacher_responses", "student_scale", "student_gpu", "kd_loss_memory", "hearing")  # fmt: skip


def test_a_recipe_file_sets_options_flags_override_it_and_help_shows_its_values(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('steps = 12\nalign-steps = 4\nlr = 1\nce_channels = "S"\nfreeze_encoder = false\n')
    cfg = parse_config(TrainConfig, ["--config", str(recipe), "--steps", "20"])
    assert (cfg.steps, cfg.align_steps, cfg.lr, cfg.ce_channels, cfg.freeze_encoder) == (20, 4, 1.0, "S", False)
    assert isinstance(cfg.lr, float)  # an int in TOML for a float option
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(recipe), "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: 12)" in shown and "(default: 4)" in shown  # --steps and --align-steps as the file set them
    # what a file cannot set is refused, naming the file and the key
    recipe.write_text("stepz = 3\n")
    with pytest.raises(ConfigError, match=r"r\.toml: unknown option 'stepz'"):
        parse_config(TrainConfig, ["--config", str(recipe)])
    recipe.write_text('steps = "many"\n')
    with pytest.raises(ConfigError, match=r"steps = 'many' is not a int"):
        parse_config(TrainConfig, ["--config", str(recipe)])
    with pytest.raises(ConfigError, match="no such file"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "none.toml")])


def test_a_config_writes_back_as_a_recipe_that_reads_as_the_same_config(tmp_path):
    cfg = replace(TrainConfig(), steps=7, lr=2.5e-4, ce_channels="T", heldout_features="", finetune_lr=1e-5)
    (tmp_path / "run.toml").write_text(dump_toml(cfg, "a run"))
    assert parse_config(TrainConfig, ["--config", str(tmp_path / "run.toml")]) == cfg


def test_the_repositorys_recipes_load_into_their_configs():
    demo = parse_config(TrainConfig, ["--config", str(REPO / "configs" / "demo.toml")])
    assert (demo.encoder, demo.adapter, demo.align, demo.align_steps, demo.steps) == ("data/models/encoder",
                                                                                      "ctc-embed", "ctc", 800, 860)
    from bench.paper_table import ROW_SET, PaperTableBench

    args = parse_args((TrainConfig, ROW_SET), PaperTableBench, argv=["--config", str(REPO / "configs" /
                                                                                   "paper_table.toml")])  # fmt: skip
    assert args.rows == [1, 2, 3, 4] and args.finetune_fraction == 0.5 and args.ce_channels == "S"
    assert not set(load_config_file(REPO / "configs" / "paper_table.toml", [TrainConfig, PaperTableBench])) & set(ROW_SET)


def test_evaluation_shares_the_trainers_input_options():
    shared = {"logits", "samples", "features", "heldout_features", "heldout_tts_features", "verify", "reference",
              "device", "precision"}  # fmt: skip
    from dataclasses import fields

    assert shared <= {f.name for f in fields(EvalConfig)} and shared <= {f.name for f in fields(TrainConfig)}
    assert {f.name: f.default for f in fields(EvalConfig) if f.name in shared} == {
        f.name: f.default for f in fields(TrainConfig) if f.name in shared}


def test_every_entry_point_is_a_console_script_and_generated_from_its_configs(capsys):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == ENTRY_POINTS
    for target in [*ENTRY_POINTS.values(), *(f"bench.{b}:main" for b in BENCHES)]:
        module, function = target.split(":")
        main = getattr(importlib.import_module(module), function)
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        assert exit_.value.code == 0, target
        assert "--config FILE" in capsys.readouterr().out, target  # every command takes a recipe file
    for path in [*REPO.glob("bench/*.py"), *REPO.glob("flows/*.py")]:
        assert "sys.path.insert" not in path.read_text(), path


def test_a_bad_recipe_key_is_one_line_and_exit_2_on_the_command_line(tmp_path):
    (tmp_path / "bad.toml").write_text("top_kk = 3\n")
    one_line_error(run(["-m", "pipeline.teacher", "--config", str(tmp_path / "bad.toml")]), 2, "unknown option 'top_kk'")


def test_model_parallelism_on_vllms_cpu_build_is_refused_before_any_engine():
    from pipeline.engine import check_platform
    from pipeline.teacher_config import TeacherConfig

    with pytest.raises(ConfigError, match="model parallelism needs GPUs"):
        check_platform(TeacherConfig(tensor_parallel_size=2))


def test_the_import_graph_has_no_cycle_and_no_upward_import(capsys):
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    import_graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(import_graph)
    assert import_graph.main([]) == 0, capsys.readouterr().out
    edges = import_graph.graph()
    assert not any(b.startswith("toy") for a, targets in edges.items() if a.startswith("pipeline") for b in targets)
    assert not any(b.startswith(("student", "flows")) for a, t in edges.items() if a.startswith("pipeline") for b in t)
    assert "pipeline.cache.codec" in edges["pipeline.cache"]  # a package's re-exports are edges too
    assert "student.model" in edges["toy.encoder"]  # function-level imports count (make_encoder's)

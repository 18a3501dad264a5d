"""bench.hearing: runs side by side, one column each, from student.bench_eval's report.json."""

import json

from bench.hearing import main, read_run, render


def write_report(run, speech: dict[str, float]):
    """A report.json in student.bench_eval's layout (report["subsets"]: one entry per subset)."""
    def score(x):
        return {"score": x, "ci95": [x - 0.01, x + 0.01], "n": 900, "fallbacks": 0, "unscored": 0}

    subsets = [{"subset": s, "metric": "exact match", "questions": 900, "student_speech": score(x),
                "student_text": score(0.99), "teacher_text": score(0.978)} for s, x in speech.items()]  # fmt: skip
    (run / "benchmark").mkdir(parents=True)
    (run / "benchmark" / "report.json").write_text(json.dumps({"overall": {}, "run": {}, "subsets": subsets}))


def test_each_run_is_a_column_and_a_subset_a_run_lacks_is_a_dash(tmp_path):
    write_report(tmp_path / "a", {"toy": 0.76, "toy-heldout-tts": 0.053, "toy-noise-20db": 0.457})
    write_report(tmp_path / "b", {"toy": 0.604, "toy-heldout-tts": 0.15})
    table = render([read_run(str(tmp_path / "a"), "clean"), read_run(str(tmp_path / "b"), "perturbed")])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| ") and "`" in line}  # fmt: skip
    assert rows["training voices (espeak-ng grid + Festival) (`toy`)"] == [
        "76.0% [75.0%, 77.0%]", "60.4% [59.4%, 61.4%]", ">= 77%"]
    assert rows["held-out family: Flite (`toy-heldout-tts`)"][:2] == ["5.3% [4.3%, 6.3%]", "15.0% [14.0%, 16.0%]"]
    assert rows["pink noise, 20 dB SNR (`toy-noise-20db`)"][:2] == ["45.7% [44.7%, 46.7%]", "-"]
    assert "| clean | perturbed | target |" in table and "student text 99.0%" in table


def test_a_missing_report_or_a_name_count_that_does_not_match_is_one_line(tmp_path, capsys):
    write_report(tmp_path / "a", {"toy": 0.5})
    assert main(["--runs", f"{tmp_path / 'a'},{tmp_path / 'nope'}"]) == 3
    assert "nope/benchmark/report.json: no benchmark report; run `python -m student.bench_eval" in capsys.readouterr().err
    assert main(["--runs", str(tmp_path / "a"), "--names", "x,y"]) == 4
    assert "--names has 2 names for 1 runs" in capsys.readouterr().err

"""Integration: a real Prefect server on loopback, the served deployment, `prefect deployment run`."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.cache import CacheReader
from pipeline.query import connect

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: process exited with {p.returncode}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow
def test_served_deployment_runs_the_flow_on_two_ray_workers_and_writes_the_cache(tiny_teacher, tiny_rows, tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "RAY_AUTH_MODE": "disabled",
    }
    src = tmp_path / "tiny.jsonl"
    rows = tiny_rows[:30]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "data"
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("server", "serve")}
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=logs["server"], stderr=subprocess.STDOUT)  # fmt: skip
    serve = None
    try:

        def healthy():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).status == 200
            except OSError:
                return False

        _wait(healthy, 120, "the Prefect server", [server])
        serve = subprocess.Popen(
            [sys.executable, "flows/cache_teacher.py", "--serve", "it", "--data-dir", str(data), "--source", str(src),
             "--teacher", str(tiny_teacher), "--top-k", "8", "--voices", "en-us", "--rates", "170",
             "--max-model-len", "128", "--kv-cache-gib", "0.25", "--dtype", "float32"],
            cwd=REPO, env=env, stdout=logs["serve"], stderr=subprocess.STDOUT,
        )  # fmt: skip

        def deployed():
            r = subprocess.run([PREFECT, "deployment", "inspect", "cache-teacher/it"], env=env, capture_output=True)
            return r.returncode == 0

        _wait(deployed, 120, "the deployment to be served", [server, serve])
        # the deployment takes the flow's parameters: here the caching on 2 Ray workers, 2 partitions
        run = subprocess.run([PREFECT, "deployment", "run", "cache-teacher/it", "--watch", "--param", "workers=2",
                              "--param", "partitions=2"], env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + (tmp_path / "serve.log").read_text()[-3000:]
        assert "Completed" in run.stdout

        reader = CacheReader(data / "cache", verify=True)
        assert reader.partitions == 2
        assert sorted(reader.sample_ids()) == sorted(r["sample_id"] for r in rows)
        assert reader.encoding.top_k == 8
        con = connect(data)
        assert con.sql("SELECT count(*) FROM features").fetchall()[0][0] == len(rows)
        # the eval split, also spoken by the held-out voice (never a training voice), for the student's eval
        from pipeline.features import FeatureStore

        held = FeatureStore(data / "features-heldout-voice")
        eval_ids = {r["sample_id"] for r in rows if r["split"] == "eval"}
        assert eval_ids and {sid for sid, _, _ in held.keys()} == eval_ids
        assert {rend.split("@")[0] for _, rend, _ in held.keys()} == {"en-029"}
        # ... and by another synthesizer (--heldout-tts, default flite, in its own voices)
        held_tts = FeatureStore(data / "features-heldout-tts")
        assert {sid for sid, _, _ in held_tts.keys()} == eval_ids
        assert {rend.split("@")[0] for _, rend, _ in held_tts.keys()} <= {"awb", "kal16", "rms", "slt"}
        assert not (data / "models" / "encoder").exists()  # a user's dataset: no toy encoder is built
        assert con.sql("SELECT count(DISTINCT sample_id) FROM teacher_tokens").fetchall()[0][0] == len(rows)
        art = subprocess.run([PREFECT, "artifact", "inspect", "cache-teacher-summary"], env=env, capture_output=True,
                             text=True)  # fmt: skip
        assert art.returncode == 0 and "bytes per cached token" in art.stdout
    finally:
        for p in (serve, server):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        for fh in logs.values():
            fh.close()


def test_the_flows_held_out_voice_is_the_tts_own_unless_given(tiny_vits):
    """--heldout-voice auto (the default) is the backend's held-out voice: espeak-ng's en-029 (a mix's: its first
    synthesizer's), a VITS model's last speaker (read from its config), none for flite; --heldout-tts auto is a
    synthesizer the training speech never used, and one it used is refused; --tts-model belongs to --tts vits
    alone."""
    import pytest

    from flows.cache_teacher import split_parameters
    from pipeline.config import ConfigError

    def held(**params):
        return split_parameters({"teacher": "some/teacher", **params})[0].heldout_voice

    def held_tts(**params):
        return split_parameters({"teacher": "some/teacher", **params})[0].heldout_tts

    assert held() == "en-029" and held(tts="flite") is None
    assert held_tts() == held_tts(tts="vits", tts_model=str(tiny_vits)) == "flite"
    assert held_tts(tts="flite") == held_tts(tts="espeak-ng+flite") == "festival"
    assert held_tts(tts="flite+festival") == "espeak-ng" and held_tts(tts="espeak-ng+festival+flite") == ""
    with pytest.raises(ConfigError, match="--heldout-tts flite is a synthesizer of the training speech"):
        held_tts(tts="flite", heldout_tts="flite")
    with pytest.raises(ConfigError, match="--heldout-tts festival is a synthesizer of the training speech "
                                          r"\(--tts espeak-ng\+festival\)"):
        held_tts(heldout_tts="festival")
    with pytest.raises(ConfigError, match="--tts espeak: unknown text-to-speech backend"):
        held_tts(tts="espeak")
    assert held(tts="vits", tts_model=str(tiny_vits)) == "spk3"
    assert held(tts="vits", tts_model=str(tiny_vits), heldout_voice="") is None
    with pytest.raises(ConfigError, match="also one of the 2 training voices"):
        held(tts="vits", tts_model=str(tiny_vits), voices=["spk0", "spk3"])
    with pytest.raises(ConfigError, match="--tts-model is for --tts vits"):
        held(tts="flite", tts_model=str(tiny_vits))
    with pytest.raises(ConfigError, match=r"--perturb-train must be a fraction in \[0, 1\], got 1.5"):
        held(perturb_train=1.5)


def test_the_flow_refuses_at_once_a_synthesizer_this_machine_lacks(tmp_path, monkeypatch):
    """The held-out synthesizer is on by default (flite): where flite is not installed the flow stops before any
    work with one line that says how to install it or turn it off, instead of retrying a task that cannot run."""
    import shutil

    import pytest

    from flows.cache_teacher import split_parameters
    from pipeline.config import ConfigError
    from pipeline.errors import UserError
    from pipeline.speech import Flite

    bin_dir = tmp_path / "bin"  # a PATH with espeak-ng and without flite
    bin_dir.mkdir()
    for program in ("espeak-ng", "festival"):
        (bin_dir / program).symlink_to(shutil.which(program))
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(ConfigError, match=r"--heldout-tts flite: 'flite' \(flite\) not found on PATH: install it .*"
                                          r"or --heldout-tts ''"):
        split_parameters({"teacher": "some/teacher"})
    flow_cfg, _ = split_parameters({"teacher": "some/teacher", "heldout_tts": ""})
    assert flow_cfg.heldout_tts == "" and flow_cfg.heldout_voice == "en-029"
    with pytest.raises(ConfigError, match="--tts flite: 'flite'"):
        split_parameters({"teacher": "some/teacher", "tts": "flite"})
    with pytest.raises(UserError, match="not found on PATH"):
        Flite()

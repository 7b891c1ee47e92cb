"""SupervisedProcess with real child processes: restarts after a crash, a clean stop, and the trainer's settings."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

from alignloop.supervisor import SupervisedProcess, trainer_process
from serve.settings import GatewaySettings


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_crashing_process_is_restarted_with_its_environment(tmp_path):
    log = tmp_path / "child.log"
    command = [sys.executable, "-c", "import os, sys; print('run', os.environ['MARK'], flush=True); sys.exit(3)"]
    process = SupervisedProcess("crasher", command, {"MARK": "m-42"}, log, min_backoff_s=0.05, max_backoff_s=0.1)
    process.start()
    wait_for(lambda: process.restarts >= 3)
    process.stop()
    assert log.read_text().count("run m-42") >= 3


def test_stop_terminates_a_running_process_and_no_restart_follows(tmp_path):
    command = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]
    process = SupervisedProcess("sleeper", command, {}, tmp_path / "sleeper.log", min_backoff_s=0.05)
    process.start()
    wait_for(lambda: "up" in (tmp_path / "sleeper.log").read_text() if (tmp_path / "sleeper.log").exists() else False)
    pid = process.pid
    assert process.stop(grace_s=10) == -signal.SIGTERM
    time.sleep(0.3)
    assert process.pid == pid and process.restarts == 0


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    )
    process = SupervisedProcess("stubborn", [sys.executable, "-c", code], {}, tmp_path / "s.log")
    process.start()
    wait_for(lambda: (tmp_path / "s.log").exists() and "up" in (tmp_path / "s.log").read_text())
    assert process.stop(grace_s=0.5) == -signal.SIGKILL


def test_the_trainer_runs_against_this_gateway_with_its_store_model_and_the_service_key(tmp_path):
    settings = GatewaySettings(
        host="0.0.0.0",
        port=8123,
        store_url=f"sqlite:///{tmp_path}/s.db",
        model="models/x",
        adapter_dir=tmp_path / "adapters",
        api_keys=["ops:key-one-123456", "key-two-123456"],
        service_key="the-trainers-own-key",
    )
    trainer = trainer_process(settings, tmp_path / "trainer.log")
    assert trainer.command[-3:] == ["-m", "alignloop.cli", "trainer"]
    assert {k: v for k, v in trainer.env.items() if k.startswith("ALIGNLOOP_TRAINER_")} == {
        "ALIGNLOOP_TRAINER_STORE_URL": f"sqlite:///{tmp_path}/s.db",
        "ALIGNLOOP_TRAINER_MODEL": "models/x",
        "ALIGNLOOP_TRAINER_ADAPTER_DIR": str(tmp_path / "adapters"),
        "ALIGNLOOP_TRAINER_GATEWAY_URL": "http://127.0.0.1:8123",
        "ALIGNLOOP_TRAINER_PUBLIC_ALIAS": "llava-rlhf",
        "ALIGNLOOP_TRAINER_API_KEY": "the-trainers-own-key",
    }
    assert trainer_process(settings, tmp_path / "trainer.log", cpus="1").env["ALIGNLOOP_TRAINER_CPUS"] == "1"


def test_helpers_start_and_stop_with_the_apps_lifespan(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from alignloop.supervisor import with_helpers

    log = tmp_path / "helper.log"
    helper = SupervisedProcess(
        "helper", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"], {}, log
    )
    app = FastAPI()
    app.get("/ping")(lambda: {"ok": True})
    with TestClient(with_helpers(app, [helper])) as client:
        assert client.get("/ping").json() == {"ok": True}
        wait_for(lambda: log.exists() and "up" in log.read_text())
        child = psutil.Process(helper.pid)
        assert child.is_running()
    wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10)


def test_a_helper_dies_with_a_supervisor_killed_by_sigkill(tmp_path):
    script = (
        "import sys, time\n"
        "from alignloop.supervisor import SupervisedProcess\n"
        "sleeper = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
        f"p = SupervisedProcess('orphan', sleeper, {{}}, {str(tmp_path / 'o.log')!r})\n"
        "p.start()\n"
        "while p.pid is None: time.sleep(0.05)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait(10)
    wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10)

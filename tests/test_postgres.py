"""The cluster's tracking server for real: PostgreSQL and an MLflow server over it, started by
cluster/mlflow_server.sh (what the cluster files run on the head), and a sweep of 104 cells written
through it by two trainings at a time."""

import base64
import dataclasses
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
from mlflow.tracking import MlflowClient

import records
from browser import body, charts_each_layers_gradient_norm, log_in, training_pages
from conftest import RecordingSink, free_port, http_status
from disks import full_file_system
from distnet import cli, data, launch, schema, space, sweep, tracking, tracking_server, ui, worker

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.server]
SCRIPT = ROOT / "cluster" / "mlflow_server.sh"


@dataclasses.dataclass
class Server:
    uri: str
    state: Path  # the script's STATE_DIR
    env: dict  # the script's environment (ports)


@pytest.fixture(scope="module")
def postgres_mlflow():
    """PostgreSQL on a loopback port (as the `postgres` user when we are root) and `mlflow server`
    over it, with its login (the admin's, which the script generated) in this process's environment
    as MLflow's clients take it, not in Ray's (started before, without it): the trainings get it
    from distnet. Both stopped at the end."""
    assert list(Path("/usr/lib/postgresql").glob("*/bin/initdb")), \
        "PostgreSQL is not installed: `make test` installs Debian's postgresql where it can (apt-get as root)"
    state = Path(tempfile.mkdtemp(prefix="dnpg", dir="/tmp"))
    state.chmod(0o755)  # the postgres user must reach its data directory inside
    port = free_port()
    env = {**os.environ, "MLFLOW": str(Path(sys.executable).parent / "mlflow"), "MLFLOW_HOST": "127.0.0.1",
           "MLFLOW_PORT": str(port), "PG_PORT": str(free_port())}
    try:
        subprocess.run(["bash", str(SCRIPT), "start", str(state)], env=env, check=True, timeout=120)
        uri = f"http://127.0.0.1:{port}"
        tracking_server.wait_for_server(uri, log=state / "mlflow.log")
        with pytest.MonkeyPatch.context() as mp:
            for key, value in tracking_server.Login.from_file(state / "credentials").environ().items():
                mp.setenv(key, value)
            yield Server(uri, state, env)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


PACK = 13
SWEEP_104 = f"""name: pg104
model: {{width: 16, activation: tanh}}
data: {{train_limit: 1280, eval_limit: 200}}  # 10 steps
train: {{epochs: 1, log_every: 4, metric_points: 5}}  # intervals of 2 steps
ray: {{num_workers: 1, cpus_per_worker: 1, storage_path: runs}}
mlflow: {{experiment: pg}}
sweep: {{pack: {PACK}, max_concurrent: 2}}  # 8 trainings, 2 at once
grid: {{model.depth: [1, 2], model.init: [xavier_normal, he_normal, nielsen_scaled, lecun_normal], seed: [{", ".join(map(str, range(13)))}]}}
"""


def test_a_104_cell_sweep_through_the_server_after_a_driver_kill_holds_every_value(ray_cluster, postgres_mlflow,
                                                                                   tmp_path, monkeypatch, capsys):
    """104 cells (2 depths x 4 inits x 13 seeds) in 8 jobs on 2 concurrent lanes through the server.
    `distnet sweep` is SIGKILLed once some cells are finished and the same sweep run again: every
    cell has one run whose params, tags, every metric value, step table and summary row are what its
    training computes (each pack trained again here, alone, with the recording sink), none written
    twice; the killed driver had created runs only a few jobs ahead of the lanes; the two lanes
    wrote at the same time. The trainings wrote with the login that distnet handed them (Ray's
    workers have none), and it is nowhere in the records or in what either driver said; `distnet
    ui` prints the link and how a person logs in."""
    monkeypatch.chdir(tmp_path)
    uri = postgres_mlflow.uri
    assert MlflowClient(uri).search_experiments()  # a real server: the default experiment is there
    spec = tmp_path / "pg104.yaml"
    spec.write_text(SWEEP_104)
    client = MlflowClient(uri)

    def cells(status: str | None = None) -> list:
        exp = client.get_experiment_by_name("pg")
        query = "tags.`distnet.cell_id` != ''" + (f" and attributes.status = '{status}'" if status else "")
        return client.search_runs([exp.experiment_id], query, max_results=1000) if exp else []

    killed_said = tmp_path / "killed.out"
    with open(killed_said, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "distnet.cli", "sweep", str(spec), "--tracking-uri", uri,
                                 "--address", ray_cluster], cwd=tmp_path, env={**os.environ, "RAY_AUTH_MODE": "token"},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while not cells("FINISHED") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, f"the sweep ended first ({proc.returncode}):\n{killed_said.read_text()[-4000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Ray ends the dead driver's trainers; a rank 0 closing its job as the driver died may still
    # finish it. Until nothing changes for 5 s:
    seen, still = None, time.time()
    while time.time() - still < 5:
        now = {(r.info.run_id, r.info.status) for r in cells()}
        seen, still = now, still if now == seen else time.time()
        time.sleep(0.5)
    finished, created = {r.info.run_id for r in cells("FINISHED")}, cells()
    assert 1 <= len(finished) < 104
    # Runs exist only for finished jobs, the two lanes' jobs, the two queued and the one being made.
    assert len(created) <= len(finished) + 5 * PACK and len(created) < 104

    sw = sweep.load_sweep(spec)
    said = []
    result = launch.run_sweep(sw, uri, address=ray_cluster, say=said.append)
    assert result.trained == 104 - len(finished) and not result.failed
    live = {r.data.tags["distnet.cell_id"]: r for r in cells()}
    assert len(cells()) == len(live) == 104  # one live run per cell
    assert finished <= {r.info.run_id for r in live.values()}  # the finished cells kept theirs
    assert {r.info.run_id for r in tracking.child_runs(uri, result.parent_run_id)} == \
        {r.info.run_id for r in live.values()}
    # The trainings wrote with the login that distnet handed them: Ray's workers have none of their own.
    password = os.environ[tracking_server.PASSWORD]
    assert ray.get(ray.remote(lambda: tracking_server.PASSWORD in os.environ).remote()) is False
    # ... and it is nowhere in the records or in what the drivers said.
    parent = client.get_run(result.parent_run_id)
    assert not any(password in str(v) for v in [*said, killed_said.read_text(), *parent.data.params.values(),
                                                *parent.data.tags.values()])
    summary = Path(client.download_artifacts(result.parent_run_id, "summary.csv", str(tmp_path))).read_text()
    assert password not in summary and summary == sweep.summary_csv(result.rows)

    # What each cell's training computed: its pack trained again here with the recording sink. The
    # killed driver packed all cells; the rerun, the ones it found unfinished.
    arrays = data.select(data.load_mnist(), "test", 1280, 200)
    rerun = [c for c in sw.cells if live[c.id].info.run_id not in finished]
    packs = {False: sweep.packs(sw.cells, PACK), True: sweep.packs(rerun, PACK)}
    computed = {}
    rows = {r.cell: r for r in result.rows}

    def pack_of(cell) -> tuple[tuple[bool, int], list]:
        """(rerun or not, job index) of the pack `cell` trained in, and the pack's cells."""
        run = live[cell.id]
        key = (run.info.run_id not in finished, int(run.data.params["name"].rsplit("-", 1)[1]))
        return key, packs[key[0]][key[1]]

    for cell in sw.cells:
        key, group = pack_of(cell)
        if key not in computed:
            computed[key] = RecordingSink()
            worker.train(sweep.population_config(group, f"pg104-{key[1]}"), arrays, worker.WorkerEnv(), computed[key])

    def recorded(cell) -> tuple[RecordingSink, int]:
        """The recording of the pack `cell` trained in, and its member index there."""
        key, group = pack_of(cell)
        return computed[key], [c.id for c in group].index(cell.id)

    def check(cell) -> tuple[str, list[int]]:
        """One cell against its training; its lane and test/acc timestamps."""
        run = live[cell.id]
        cfg = cell.config
        sink, k = recorded(cell)
        assert run.info.status == "FINISHED" and run.data.tags["distnet.status"] == "finished"
        assert not any(password in v for v in [*run.data.params.values(), *run.data.tags.values()])
        # its pack's training: the member config is the cell's, named for the job
        assert re.fullmatch(r"pg104-\d+", run.data.params["name"])
        records.assert_described(client, run, sw, cell)  # name, params, tags; config.yaml the config, so no password
        assert {k: run.data.tags[k] for k in ("distnet.all_reduce", "mlflow.parentRunId")} == \
            {"distnet.all_reduce": "none", "mlflow.parentRunId": result.parent_run_id}
        table = records.assert_run_holds(client, run, sink, k)  # every step once, every MLflow value
        np.testing.assert_array_equal(table["step"], np.arange(10))
        first, last = (np.float64(table[f"grad_norm/w/layer_{l}"]) for l in (1, cfg.model.depth + 1))
        row = rows[cell.label]
        assert row.run_id == run.info.run_id and row.status == "finished"
        assert row.acc == pytest.approx(float(sink.series("test/acc")[-1][1][k]), rel=1e-12)
        assert row.ratio_init == pytest.approx(first[0] / last[0], rel=1e-12)
        assert row.ratio_end == pytest.approx(first[-1] / last[-1], rel=1e-12)
        assert run.data.metrics[schema.RATIO_INIT] == row.ratio_init
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        acc = client.get_metric_history(run.info.run_id, "test/acc")
        assert sorted(m.step for m in acc) == [0, 1]
        return run.data.tags["distnet.lane"], [m.timestamp for m in acc]

    spans: dict[str, list[int]] = {}
    with ThreadPoolExecutor(8) as pool:  # the reads are HTTP round trips: several in flight at once
        for lane, stamps in pool.map(check, sw.cells):
            spans.setdefault(lane, []).extend(stamps)
    # The two lanes wrote at the same time: their spans of metric timestamps overlap.
    assert set(spans) == {"0", "1"}
    assert max(min(t) for t in spans.values()) < min(max(t) for t in spans.values())
    # `distnet ui` on the server: the link, and how a person logs in (not the password).
    capsys.readouterr()
    assert cli.main(["ui", "pg104", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"{uri}/#/experiments/{parent.info.experiment_id}" in out
    assert "the server asks for a login: user 'admin', password as in MLFLOW_TRACKING_PASSWORD" in out
    assert password not in out


def test_the_server_answers_only_its_login_and_its_own_host_names(postgres_mlflow):
    """cluster/mlflow_server.sh's server: 401 without the login or with a wrong password, 403 for a
    Host header that is none of this host's names (DNS rebinding), the admin's generated password
    kept readable by its user only."""
    uri = postgres_mlflow.uri
    user, password = os.environ[tracking_server.USERNAME], os.environ[tracking_server.PASSWORD]
    port = uri.rsplit(":", 1)[1]

    def status(login: tuple[str, str] | None, host: str | None = None) -> int:
        headers = {"Authorization": "Basic " + base64.b64encode(":".join(login).encode()).decode()} if login else {}
        return http_status(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1",
                           {**headers, **({"Host": host} if host else {})})

    assert status(None) == 401
    assert status((user, password + "x")) == 401
    assert status(("someone", password)) == 401
    assert status((user, password)) == 200
    assert status((user, password), f"localhost:{port}") == 200
    assert status((user, password), f"{socket.gethostname()}:{port}") == 200
    assert status((user, password), f"evil.example:{port}") == 403
    assert status((user, password), "10.213.9.9") == 403  # an address that is not this host's
    assert stat.S_IMODE((postgres_mlflow.state / "credentials").stat().st_mode) == 0o600
    assert user == "admin" and len(password) >= 24


def test_a_person_with_the_login_sees_each_layers_gradient_norm_in_the_ui(ray_cluster, postgres_mlflow, browser,
                                                                          tmp_path, monkeypatch):
    """The cluster's UI as a person meets it (served as the head serves it, by gunicorn): the page
    asks for the login; logged in, a cell's run page charts each layer's gradient norm."""
    monkeypatch.chdir(tmp_path)
    uri = postgres_mlflow.uri
    raw = {"name": "pgui", "model": {"width": 16}, "train": {"epochs": 1, "log_every": 2},
           "data": {"train_limit": 640, "eval_limit": 100}, "ray": {"num_workers": 1}, "mlflow": {"experiment": "pgui"},
           "grid": {"model.depth": [2]}}
    result = launch.run_sweep(sweep.build_sweep(raw), uri)
    (run,) = tracking.child_runs(uri, result.parent_run_id)
    page = ui.run_link(uri, run.info.experiment_id, run.info.run_id)  # what `distnet ui` prints for a run
    assert http_status(page) == 401
    log_in(browser, os.environ[tracking_server.USERNAME], os.environ[tracking_server.PASSWORD])
    charts_each_layers_gradient_norm(browser, page, layers=3)  # depth 2: 3 weight matrices
    assert training_pages(body(browser))


def test_a_full_artifact_store_is_named_with_the_bytes_needed_and_the_write_waits(postgres_mlflow, tmp_path):
    """The server's artifact store full: an upload through it (as rank 0 makes them) is answered
    with the file on the server's disk, the bytes it needs and the room left (HTTP 507, not MLflow's
    bare 500), waits, and goes in whole once space is freed."""
    client = MlflowClient(postgres_mlflow.uri)
    exp_id = client.create_experiment("full-store")
    run_id = client.create_run(exp_id).info.run_id
    local = tmp_path / "part-000.parquet"
    local.write_bytes(os.urandom(300_000))
    heard: list = []
    with full_file_system(postgres_mlflow.state / "artifacts" / exp_id) as filler:
        upload = threading.Thread(target=tracking.upload, args=(postgres_mlflow.uri, tracking.RunRef(run_id), local,
                                                                 "step_metrics", heard.append))
        upload.start()
        deadline = time.time() + 60
        while not heard and time.time() < deadline:
            time.sleep(0.2)
        assert heard == [space.Full(str(postgres_mlflow.state / "artifacts" / exp_id / run_id / "artifacts" /
                                         "step_metrics" / local.name), 300_000, 0)]
        assert upload.is_alive()
        filler.unlink()
        upload.join(60)
        assert not upload.is_alive() and heard[1:] == [None]
        got = client.download_artifacts(run_id, f"step_metrics/{local.name}", str(tmp_path / "back"))
        assert Path(got).read_bytes() == local.read_bytes()


@pytest.mark.parametrize("login", [None, ("admin", "not-the-password")])
def test_a_driver_without_the_login_stops_before_anything_starts(postgres_mlflow, tmp_path, login):
    """`distnet sweep` against the server without its login, or with a wrong one: a clear error
    (exit 2) that says which variables to set and where a cluster keeps them, shows no password,
    and nothing written to the server."""
    env = {k: v for k, v in os.environ.items() if k not in (tracking_server.USERNAME, tracking_server.PASSWORD)}
    if login:
        env |= {tracking_server.USERNAME: login[0], tracking_server.PASSWORD: login[1]}
    spec = tmp_path / "nologin.yaml"
    spec.write_text("name: nologin\nmodel: {width: 16}\nmlflow: {experiment: nologin}\ngrid: {model.depth: [1, 2]}\n")
    proc = subprocess.run([sys.executable, "-m", "distnet.cli", "sweep", str(spec), "--tracking-uri",
                           postgres_mlflow.uri], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    said = "refuses the login of 'admin'" if login else "refuses requests without a login"
    assert f"distnet: the tracking server {postgres_mlflow.uri} {said} (HTTP 401)" in proc.stderr
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in proc.stderr
    assert "credentials" in proc.stderr
    assert not login or login[1] not in proc.stdout + proc.stderr
    assert MlflowClient(postgres_mlflow.uri).get_experiment_by_name("nologin") is None


def test_a_lost_credentials_file_stops_the_server_from_starting_with_a_new_password(postgres_mlflow):
    """The admin exists in the user store from the first start on: with STATE_DIR/credentials gone
    and the store kept, the script refuses to start (a new password would not be taken) and says
    what to do; with the file back, the server starts and takes the same login."""
    server, credentials = postgres_mlflow, postgres_mlflow.state / "credentials"
    kept = credentials.read_bytes()
    subprocess.run(["bash", str(SCRIPT), "stop", str(server.state)], env=server.env, check=True, timeout=120)
    credentials.unlink()
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start", str(server.state)], env=server.env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1 and "credentials is gone but the user store (database mlflow_auth) is not" in proc.stderr
        assert not credentials.exists()
    finally:
        credentials.write_bytes(kept)
        credentials.chmod(0o600)
        subprocess.run(["bash", str(SCRIPT), "start", str(server.state)], env=server.env, check=True, timeout=120)
        tracking_server.wait_for_server(server.uri, log=server.state / "mlflow.log")
    assert MlflowClient(server.uri).search_experiments(max_results=1) is not None  # the login of the first start

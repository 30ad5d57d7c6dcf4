"""Where a training's records go and how to reach them: the tracking URI, whether a tracking
server answers, the driver's watch on it while trainings write, and its login. What is written
there, and how, is tracking.py's."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

DEFAULT_URI = "sqlite:///mlruns.db"
SQLITE = "sqlite:///"


def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working directory.
    A relative sqlite path is made absolute: workers run in other directories."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        uri = SQLITE + str(Path(uri[len(SQLITE):]).resolve())
    return uri


def answers(uri: str, timeout: float = 5) -> bool:
    """Whether the MLflow server at `uri` answers its health check, with a plain request (the MLflow
    client retries a refused connection with back-off for minutes)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def wait_for_server(uri: str, timeout: float = 90, log: Path | None = None, process=None) -> None:
    """Until the MLflow server at `uri` answers; past the timeout, or once `process` (the server's,
    if we started it) has exited, fail with the end of its log."""
    deadline = time.time() + timeout
    while not answers(uri):
        if time.time() > deadline or (process is not None and process.poll() is not None):
            raise RuntimeError(f"no MLflow server at {uri}: "
                               + (log.read_text()[-3000:] if log and log.exists() else "no log"))
        time.sleep(0.5)


class ServerWatch:
    """The driver's watch on a tracking server while trainings write to it: says when the server
    stops answering and when it answers again. Meanwhile every write waits and is retried (MLflow's
    client retries a refused or unanswered request with back-off, about four minutes in all), so the
    trainings pause at their next checkpoint instead of failing; without this the progress would
    just stop, unexplained. Nothing to watch for a local store."""

    def __init__(self, uri: str, say: Callable[[str], None], every: float = 5.0):
        self.uri, self.say, self.every = uri, say, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        down_since = None
        while not self.stop.wait(self.every):
            up = answers(self.uri)
            if not up and down_since is None:
                down_since = time.time()
                self.say(f"tracking server {self.uri} is not answering: the trainings hold their records and "
                         "retry each write until it answers (about four minutes)")
            elif up and down_since is not None:
                self.say(f"tracking server {self.uri} answers again after {time.time() - down_since:.0f} s")
                down_since = None

    def __enter__(self):
        if is_server(self.uri):
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def is_server(uri: str) -> bool:
    """A tracking server's address, as opposed to a local store (sqlite, a folder)."""
    return uri.startswith(("http://", "https://"))


USERNAME, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
# Where a person or a job finds the login of a distnet cluster's server (cluster/mlflow_server.sh).
WHERE = ("a distnet cluster's head keeps it in its tracking server's STATE_DIR/credentials "
         "(~/mlflow/credentials by the cluster files)")


@dataclasses.dataclass(frozen=True)
class Login:
    """A tracking server's login as MLflow's client takes it, from MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD. The driver reads it from its environment and hands it to its trainings
    in the train loop's config (Ray neither stores nor shows that config; a worker's runtime_env
    would be on its command line), and rank 0 puts it into its own environment. Its repr leaves the
    password out, so that no traceback or log line shows it."""

    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> "Login":
        return cls(os.environ.get(USERNAME), os.environ.get(PASSWORD))

    @classmethod
    def from_file(cls, path: Path) -> "Login":
        """cluster/mlflow_server.sh's credentials file: `MLFLOW_TRACKING_USERNAME=...` lines."""
        values = dict(line.split("=", 1) for line in Path(path).read_text().splitlines() if "=" in line)
        return cls(values.get(USERNAME), values.get(PASSWORD))

    def environ(self) -> dict[str, str]:
        """As environment variables, the ones that are set."""
        return {k: v for k, v in ((USERNAME, self.username), (PASSWORD, self.password)) if v is not None}

    def install(self) -> None:
        """Into this process's environment, where MLflow's client reads it at each request."""
        os.environ.update(self.environ())


class LoginError(ValueError):
    """The tracking server refuses our login (or asks for one we do not have)."""


def login_hint(uri: str) -> str | None:
    """For a person opening a server's UI: how to log in, where the server asks for it (a request
    without a login is refused); None where it does not. Never the password itself."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10).close()
        return None
    except urllib.error.HTTPError as e:
        if e.code != 401:
            return None
    except OSError:
        return None
    user = os.environ.get(USERNAME, "admin")
    return f"the server asks for a login: user {user!r}, password as in {PASSWORD} ({WHERE})"


def check_login(uri: str) -> None:
    """Before anything starts: a server that asks for a login takes ours (one small request). The
    message says where the login comes from, never what it is."""
    if not is_server(uri):
        return
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as e:
        if e.get_http_status_code() not in (401, 403):
            raise
        who = os.environ.get(USERNAME)
        raise LoginError(
            f"the tracking server {uri} refuses {'the login of ' + repr(who) if who else 'requests without a login'} "
            f"(HTTP {e.get_http_status_code()}): set {USERNAME} and {PASSWORD}; {WHERE}") from None

"""Entry script for `ray submit`: runs one distnet command on the head, against the cluster.

    ray submit cluster/aws.yaml cluster/submit_entry.py train configs/default.yaml ray.use_gpu=true
    ray submit cluster/aws.yaml cluster/submit_entry.py sweep configs/depth_init_grid.yaml

`ray submit` copies this file to the head and runs it there with the arguments after it. It runs
from the repository the cluster file mounted at ~/distnet, connects to the running cluster
(`--address auto`) and logs to the head's MLflow server unless MLFLOW_TRACKING_URI says otherwise,
with the login that server generated (~/mlflow/credentials, cluster/mlflow_server.sh) unless
MLFLOW_TRACKING_USERNAME says otherwise: `ray submit` runs this over SSH, outside the environment
the head's Ray was started with.
"""

import os
import socket
import sys
from pathlib import Path

REPO = Path.home() / "distnet"
CREDENTIALS = Path.home() / "mlflow" / "credentials"  # the cluster files' STATE_DIR of the server


def main() -> int:
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    # Workers on other nodes must reach the server: the head's address, not localhost.
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"http://{socket.gethostbyname(socket.gethostname())}:5000")
    from distnet import tracking_server
    from distnet.cli import main as distnet_main

    if tracking_server.USERNAME not in os.environ and CREDENTIALS.exists():
        tracking_server.Login.from_file(CREDENTIALS).install()

    return distnet_main(sys.argv[1:] + ["--address", "auto"])


if __name__ == "__main__":
    sys.exit(main())

"""distnet's tracking-server app (`mlflow server --app-name distnet-basic-auth`, which
cluster/mlflow_server.sh starts): MLflow's basic-auth app, and a write the artifact store has no
room for answered as such. MLflow answers it with a bare 500, which its client retries for minutes
and then reports as "too many 500 error responses"; this answers a 507 that names the file, the
bytes it needs and the room left, from which the writer waits for space (distnet.space). Loaded
only in the server's processes."""

from __future__ import annotations

import os

from flask import Flask, jsonify, request
from mlflow.server import app as mlflow_app
from mlflow.server.auth import create_app as create_basic_auth_app
from werkzeug.exceptions import InternalServerError

from distnet import space

ARTIFACTS = "DISTNET_ARTIFACTS"  # the server's --artifacts-destination, where it is a folder


def full_artifact_store(error: OSError):
    """A write refused for want of space: 507 with the space.Full; any other OSError stays the 500
    Flask would have answered."""
    if not space.is_full(error):
        return InternalServerError(original_exception=error)
    root = os.environ.get(ARTIFACTS, "")
    folder = root if "://" not in root else ""  # an object store's room is not ours to read
    where = (request.view_args or {}).get("artifact_path", request.path)
    path = os.path.join(folder, where) if folder else where
    full = space.Full(path, request.content_length or 0, space.free_bytes(path) if folder else None)
    return jsonify(full.to_json()), 507


def create_app(app: Flask = mlflow_app):
    app.register_error_handler(OSError, full_artifact_store)
    return create_basic_auth_app(app)

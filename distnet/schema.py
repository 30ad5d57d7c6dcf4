"""The record's names: what a run's metrics, step-table columns and tags are called, and how its
status reads. The loop and the sink write these names; the sweep summary, `distnet report`,
`distnet ui` and the cell records read them; none of them spells one out.

Layers are numbered from 1 (input -> first hidden) to L (last hidden -> output)."""

from __future__ import annotations

# ---------------------------------------------------------------- metrics
BATCH_LOSS = "train/batch_loss"  # the global batch's loss at one step (TRAIN_LOSS: the epoch's mean)
BATCH_ACC = "train/batch_acc"  # the fraction of the global batch classified right, before that step's update
TRAIN_LOSS = "train/loss"
EPOCH_S = "perf/epoch_s"
MAX_RSS_MB = "perf/max_rss_mb"
# The sweep summary's gradient ratio, |grad W_1| / |grad W_L| at the first and the last step of the
# step table: logged with the final metrics, so a rerun summarises finished cells from the listing.
RATIO_INIT, RATIO_END = "grad_ratio/init", "grad_ratio/end"
GRAD_NORM_W = "grad_norm/w/"  # the prefix of the weights' gradient norms, one a layer
# Epoch series with one value a hidden layer: the speed of learning and the activation statistics.
LAYER_SERIES = ("speed", "act/saturated", "act/mean", "act/std")
SPEED, SATURATED, ACT_MEAN, ACT_STD = LAYER_SERIES
JACOBIAN = "jacobian/"  # the input-output Jacobian's spectrum (train.jacobian)


def layer(series: str, l: int) -> str:
    """`speed`, 3 -> `speed/layer_3`."""
    return f"{series}/layer_{l}"


def grad_norm(kind: str, l: int) -> str:
    """The norm of layer l's weight (`w`) or bias (`b`) gradient: `grad_norm/w/layer_1`."""
    return layer(f"grad_norm/{kind}", l)


def max_name(name: str) -> str:
    """`grad_norm/w/layer_1` -> `grad_norm_max/w/layer_1`: an interval's max beside its mean, in a
    section of its own in the MLflow UI."""
    head, _, rest = name.partition("/")
    return f"{head}_max/{rest}"


def jacobian(moment: str) -> str:
    return JACOBIAN + moment


# The spectrum's moments over the probe images: the mean squared singular value, its spread
# (variance / mean^2) and the largest; and q_in, the first hidden layer's pre-activation length.
JACOBIAN_MOMENTS = ("mean", "spread", "max")
JACOBIAN_Q_IN = "q_in"


# The spectrum itself, as quantiles of the squared singular values of the probe images together
# (`jacobian/q00` the smallest, `jacobian/q50` the median, `jacobian/q100` the largest): an
# equal-mass histogram that `distnet report` draws as the spectrum's distribution function.
JACOBIAN_QUANTILES = (0, 1, 5, 10, 25, 50, 75, 90, 95, 99, 100)


def quantile_name(pct: int) -> str:
    return jacobian(f"q{pct:02d}")


def eval_prefix(split: str) -> str:
    """Where held-out metrics go: `test/...` when `data.split` is test, else `val/...`."""
    return "test" if split == "test" else "val"


def acc(prefix: str) -> str:
    return f"{prefix}/acc"


def loss(prefix: str) -> str:
    return f"{prefix}/loss"


ACC_KEYS = (acc("test"), acc("val"))  # a run's held-out accuracy is under one of these


def held_out_acc(keys) -> str | None:
    """Which of ACC_KEYS a run's metric `keys` hold (the test set's first), None if neither."""
    return next((k for k in ACC_KEYS if k in keys), None)


# ---------------------------------------------------------------- tags
STATUS = "distnet.status"  # finished / diverged / failed: what the run's MLflow status does not say
DIVERGED_STEP = "distnet.diverged_step"
ERROR = "distnet.error"
ALL_REDUCE = "distnet.all_reduce"
RAY_NODE, LANE, TRAINER = "distnet.ray_node", "distnet.lane", "distnet.trainer"  # where it trained
RESUMED_FROM_STEP = "distnet.resumed_from_step"
RESTARTS = "distnet.restarts"
CELL_ID = "distnet.cell_id"
SWEEP_ID = "distnet.sweep_id"
KIND = "distnet.kind"  # `sweep` on a sweep's parent run
SWEEP_KIND = "sweep"
CASE = "case"  # a sweep's named case (sweep `cases:`)
PARENT = "mlflow.parentRunId"  # MLflow's own: the UI nests a sweep's cells under it
RUN_NAME = "mlflow.runName"

FINISHED, DIVERGED, FAILED = "finished", "diverged", "failed"


# ---------------------------------------------------------------- MLflow's search syntax
def tag(name: str) -> str:
    """A tag as a column of MLflow's searches and views: tags.`distnet.status`."""
    return f"tags.`{name}`"


def metric(key: str) -> str:
    """A metric as a column of MLflow's searches and views: metrics.`test/acc`."""
    return f"metrics.`{key}`"


def tag_is(name: str, value: str) -> str:
    """A search filter: the run's tag `name` is `value`."""
    return f"{tag(name)} = '{value}'"


def named(run_name: str) -> str:
    """A search filter: the run's name is `run_name`."""
    return f"attributes.run_name = '{run_name}'"


NEWEST_FIRST = "attributes.start_time DESC"  # a search's order_by


def run_status(tags: dict[str, str], mlflow_status: str) -> str:
    """A run's status as distnet reports it: its STATUS tag, else MLflow's own (a run still RUNNING,
    or ended before rank 0 tagged it), in lower case."""
    return tags.get(STATUS) or mlflow_status.lower()

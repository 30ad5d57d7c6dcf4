"""Run configuration: plain data, typed, validated once on the driver before anything starts.

A config is a YAML mapping plus `key=value` overrides. `load_config` merges them, checks every
field against the dataclasses below (unknown keys, types, allowed names, ranges) and returns a
frozen `Config`. Any problem raises `ConfigError` naming the field, the value and what is allowed;
the CLI turns that into exit code 2 before Ray, MLflow or any worker is touched.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from distnet import choices

N_INPUTS = 784  # MNIST pixels
N_CLASSES = 10
KILL_POINTS = ("step", "flush", "commit")  # fault.kill_in


class ConfigError(ValueError):
    """A config field is wrong. The message names the field, the value and the allowed values."""

    def __init__(self, field_path: str, value: Any, allowed: str):
        self.field = field_path
        self.value = value
        self.allowed = allowed
        super().__init__(f"config error: {field_path} = {value!r}: {allowed}")


def _choice(names) -> dict:
    return {"choices": tuple(names)}


def _positive() -> dict:
    return {"min": 0, "exclusive": True}


def _at_least(n) -> dict:
    return {"min": n, "exclusive": False}


@dataclass(frozen=True)
class ModelConfig:
    # Either `sizes` (the full layer list, 784 in and 10 out) or `depth` hidden layers of `width`.
    sizes: Optional[list[int]] = None
    depth: Optional[int] = field(default=None, metadata=_at_least(0))
    width: Optional[int] = field(default=None, metadata=_at_least(1))
    activation: str = field(default="sigmoid", metadata=_choice(choices.ACTIVATIONS))
    loss: str = field(default="softmax_ce", metadata=_choice(choices.LOSSES))
    init: str = field(default="xavier_normal", metadata=_choice(choices.INITS))
    # Weight gain multiplying the scheme's draw, and the bias std (None: the scheme's default).
    sigma_w: float = field(default=1.0, metadata=_positive())
    sigma_b: Optional[float] = field(default=None, metadata=_at_least(0))


@dataclass(frozen=True)
class DataConfig:
    dir: Optional[str] = None
    # "test": 60k train / 10k test. "validation": Nielsen's 50k train / last 10k of train as validation.
    split: str = field(default="test", metadata=_choice(("test", "validation")))
    pixel_scale: float = field(default=255.0, metadata=_choice((255.0, 256.0)))
    train_limit: Optional[int] = field(default=None, metadata=_at_least(1))
    eval_limit: Optional[int] = field(default=None, metadata=_at_least(1))
    # One seeded permutation per epoch, shared by every member and worker (members share batches).
    shuffle_seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=3, metadata=_at_least(1))
    batch_size: int = field(default=128, metadata=_at_least(1))
    lr: float = field(default=0.5, metadata=_positive())
    momentum: float = field(default=0.0, metadata=_at_least(0))
    # Nielsen's lambda: the cost gains (lambda / 2n) * sum(w^2), n = training-set size; biases exempt.
    l2: float = field(default=0.0, metadata=_at_least(0))
    max_steps: Optional[int] = field(default=None, metadata=_at_least(1))
    # Steps between host syncs of the per-step records (a cost knob, not what is logged).
    log_every: int = field(default=10, metadata=_at_least(1))
    # Points per per-step series in MLflow (each point the mean, and max, over an interval of steps):
    # the step tables keep every step; MLflow gets what its UI draws fast (docs/benchmarks.md).
    metric_points: int = field(default=50, metadata=_at_least(1))
    probe_size: int = field(default=1000, metadata=_at_least(1))
    # Per-layer gradient norms every step (the project's point: step tables and MLflow summaries);
    # off for runs that need only epoch metrics, and to measure what the norms cost.
    step_norms: bool = True
    # At init and every epoch's end, the spectrum of the hidden stack's Jacobian on the first probe
    # images (metrics.jacobian: jacobian/mean, /spread, /max): L - 1 n x n products an image.
    jacobian: bool = False
    # GPU only: capture the whole step (gather, forward, backprop, all-reduce, norms, update) as one
    # CUDA graph and replay it, so a small net's step costs one launch instead of one per operator.
    cuda_graph: bool = False


@dataclass(frozen=True)
class RayConfig:
    num_workers: int = field(default=2, metadata=_at_least(1))
    use_gpu: bool = False
    cpus_per_worker: float = field(default=1.0, metadata=_positive())
    storage_path: str = "distnet_runs"
    # Worker-group restarts (from the latest checkpoint) before a training is declared failed.
    max_failures: int = field(default=3, metadata=_at_least(0))
    # The per-step gradient all-reduce: "auto" uses shared memory between CPU workers on one x86
    # node (distnet/collective.py) and torch.distributed otherwise; "torch" always torch.distributed.
    all_reduce: str = field(default="auto", metadata=_choice(("auto", "torch")))
    # With use_gpu: the share of a GPU each worker reserves. 1 (one rank a device) for NCCL; 0.5 puts
    # two workers on one GPU, which only gloo serves (NCCL refuses two ranks on one device).
    gpus_per_worker: float = field(default=1.0, metadata=_positive())
    # torch.distributed's backend: "auto" is NCCL with GPUs and gloo without; "gloo" with GPUs moves
    # CUDA tensors through gloo, for workers that share a GPU.
    backend: str = field(default="auto", metadata=_choice(("auto", "nccl", "gloo")))


@dataclass(frozen=True)
class MlflowConfig:
    # The tracking URI is not config: --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db.
    experiment: str = "distnet"


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection, to exercise failure handling (tests, chaos drills). Off by default."""

    raise_at_step: Optional[int] = field(default=None, metadata=_at_least(0))
    # SIGKILL worker `kill_rank` when it reaches `kill_at_step`; with `once_marker`, only while that
    # file does not exist (it is created just before the kill), so a restarted worker goes on.
    kill_at_step: Optional[int] = field(default=None, metadata=_at_least(0))
    kill_rank: int = field(default=0, metadata=_at_least(0))
    once_marker: Optional[str] = None
    # Where the kill happens: at the step itself; inside rank 0's first flush of its records at or
    # after kill_at_step, once the first run's have been written (a writer that dies half-way
    # through); or right after the worker's first checkpoint commit (its report to Ray Train) at or
    # after kill_at_step, before Ray Train's controller has collected it: Ray never registers it.
    kill_in: str = field(default="step", metadata=_choice(KILL_POINTS))
    # A folder where each rank appends, per attempt, the first step it executes and that step's
    # example indices (rank<r>.jsonl): what a drill or test checks resumption and sharding with.
    trace: Optional[str] = None


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = field(default=1, metadata=_at_least(1))
    unit: str = field(default="epoch", metadata=_choice(("epoch", "step")))


@dataclass(frozen=True)
class MemberSpec:
    """One population member's own settings; None falls back to the run-level value."""

    init: Optional[str] = field(default=None, metadata=_choice(choices.INITS))
    sigma_w: Optional[float] = field(default=None, metadata=_positive())
    sigma_b: Optional[float] = field(default=None, metadata=_at_least(0))
    seed: Optional[int] = None
    lr: Optional[float] = field(default=None, metadata=_positive())


@dataclass(frozen=True)
class Member:
    """A fully resolved member: what differs between the members of one population."""

    init: str
    sigma_w: float
    sigma_b: Optional[float]
    seed: int
    lr: float


@dataclass(frozen=True)
class Config:
    name: str = "default"
    seed: int = 0  # init seed of the run's member (each population member may set its own)
    # Nielsen mode: network2.py's choices (see NIELSEN below), validated as a whole.
    nielsen: bool = False
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    fault: FaultConfig = FaultConfig()
    population: list[MemberSpec] = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        return list(self.model.sizes)

    @property
    def members(self) -> list[Member]:
        specs = self.population or [MemberSpec()]
        return [
            Member(
                init=s.init if s.init is not None else self.model.init,
                sigma_w=s.sigma_w if s.sigma_w is not None else self.model.sigma_w,
                sigma_b=s.sigma_b if s.sigma_b is not None else self.model.sigma_b,
                seed=s.seed if s.seed is not None else self.seed,
                lr=s.lr if s.lr is not None else self.train.lr,
            )
            for s in specs
        ]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def member_config(self, k: int) -> dict:
        """The resolved config of member k as a plain run: what its MLflow params describe."""
        m = self.members[k]
        d = self.to_dict()
        d.pop("population")
        d["seed"] = m.seed
        d["model"].update(init=m.init, sigma_w=m.sigma_w, sigma_b=m.sigma_b)
        d["train"]["lr"] = m.lr
        return d


# Nielsen mode = network2.py: sigmoid everywhere (output too), CrossEntropyCost, pixels/256,
# L2 as lambda/n, N(0,1) or N(0,1/n_in) weights. Values below are defaults the file may restate;
# contradicting one is an error, not a silent override.
NIELSEN = {
    "model.activation": ("sigmoid",),
    "model.loss": ("sigmoid_bce",),
    "data.pixel_scale": (256.0,),
    "model.init": ("nielsen_scaled", "nielsen"),
}


def config_hash(d: dict) -> str:
    """Stable id of a resolved config: sha256 of its canonical JSON, first 12 hex digits."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def nest(dotted: dict[str, Any]) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict = {}
    for key, v in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def parse_overrides(items: list[str]) -> dict:
    """`a.b=1` strings into a nested dict; values are parsed as YAML (so 0.5, [1,2], true work)."""
    dotted = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, item, "overrides take the form key=value, e.g. train.lr=0.5")
        dotted[key] = yaml.safe_load(raw)
    return nest(dotted)


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _check_value(path: str, value: Any, tp, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(path, value, args[0], meta)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(path, value, f"must be a list of {_type_name(item_tp)}")
        return [_check_value(f"{path}[{i}]", v, item_tp, {}) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, value, f"must be a mapping with keys {_field_names(tp)}")
        return build_dataclass(tp, value, path + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "must be true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "must be an integer")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, "must be a number")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "must be a string")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(path, value, "must be one of " + ", ".join(map(str, meta["choices"])))
    if "min" in meta:
        lo = meta["min"]
        if value < lo or (meta["exclusive"] and value == lo):
            raise ConfigError(path, value, f"must be {'>' if meta['exclusive'] else '>='} {lo}")
    return value


def _field_names(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


@functools.cache
def _type_hints(cls) -> dict:
    """A config class's resolved field types: resolving them is 80% of validating a config, and a
    10,000-cell grid validates 10,000 configs before anything starts."""
    return typing.get_type_hints(cls)


def build_dataclass(cls, raw: dict, prefix: str = ""):
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}", raw[key], f"unknown key; allowed: {_field_names(cls)}")
    kwargs = {
        name: _check_value(f"{prefix}{name}", raw[name], hints[name], dict(f.metadata))
        for name, f in fields.items()
        if name in raw
    }
    return cls(**kwargs)


def _resolve_sizes(model: dict) -> dict:
    sizes, depth, width = model.get("sizes"), model.get("depth"), model.get("width")
    if sizes is None:
        if depth is None or width is None:
            raise ConfigError("model.sizes", None, "give model.sizes, or model.depth and model.width")
        sizes = [N_INPUTS] + [width] * depth + [N_CLASSES]
    if len(sizes) < 2 or sizes[0] != N_INPUTS or sizes[-1] != N_CLASSES or min(sizes) < 1:
        raise ConfigError(
            "model.sizes", sizes, f"must start with {N_INPUTS}, end with {N_CLASSES}, all >= 1"
        )
    hidden = sizes[1:-1]
    if depth is not None and depth != len(hidden):
        raise ConfigError("model.depth", depth, f"model.sizes {sizes} has {len(hidden)} hidden layers")
    uniform = hidden[0] if hidden and len(set(hidden)) == 1 else None
    if width is not None and width != uniform:
        raise ConfigError("model.width", width, f"model.sizes {sizes} has hidden widths {hidden}")
    return {**model, "sizes": sizes, "depth": len(hidden), "width": uniform}


def _get(d: dict, dotted: str):
    for p in dotted.split("."):
        d = d.get(p, {}) if isinstance(d, dict) else {}
    return d if d != {} else None


def _set_default(d: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d.setdefault(leaf, value)


def _variance_form(section: dict, prefix: str) -> dict:
    """`sigma_w2` / `sigma_b2`, the variances mean-field theory is written in (W ~ N(0, sigma_w2 / n_in)
    with a unit-variance scheme such as lecun_normal), become the gains sigma_w / sigma_b they square.
    Resolved here, at the edge, so everything downstream (members, packing, params) sees one field."""
    section = dict(section)
    for std, lowest in (("sigma_w", 0.0), ("sigma_b", None)):
        var = std + "2"
        if var not in section:
            continue
        value = section.pop(var)
        if std in section:
            raise ConfigError(f"{prefix}{var}", value, f"give {prefix}{std} (a std) or {prefix}{var} (its square), "
                              "not both")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value == lowest:
            raise ConfigError(f"{prefix}{var}", value, "must be a number " + ("> 0" if lowest == 0.0 else ">= 0"))
        section[std] = math.sqrt(value)
    return section


def build_config(raw: dict) -> Config:
    """Validate a merged raw mapping into a Config (raises ConfigError)."""
    if not isinstance(raw, dict):
        raise ConfigError("<config>", raw, "must be a YAML mapping")
    raw = merge({}, raw)  # a copy: defaults below must not leak into the caller's dict
    if raw.get("nielsen") is True:
        for dotted, allowed in NIELSEN.items():
            _set_default(raw, dotted, allowed[0])
            value = _get(raw, dotted)
            if value not in allowed:
                raise ConfigError(dotted, value, "nielsen mode needs " + " or ".join(map(str, allowed)))
    if "model" in raw and not isinstance(raw["model"], dict):
        raise ConfigError("model", raw["model"], f"must be a mapping with keys {_field_names(ModelConfig)}")
    raw["model"] = _resolve_sizes(_variance_form(raw.get("model", {}), "model."))
    if isinstance(raw.get("population"), list):
        raw["population"] = [_variance_form(m, f"population[{i}].") if isinstance(m, dict) else m
                             for i, m in enumerate(raw["population"])]
    cfg = build_dataclass(Config, raw)
    batch, workers = cfg.train.batch_size, cfg.ray.num_workers
    if batch % workers:
        raise ConfigError(
            "ray.num_workers", workers,
            f"must divide train.batch_size={batch}; allowed: "
            + ", ".join(str(w) for w in range(1, batch + 1) if batch % w == 0),
        )
    if cfg.train.cuda_graph and not cfg.ray.use_gpu:
        raise ConfigError("train.cuda_graph", True, "CUDA graphs need GPU workers: set ray.use_gpu: true, "
                          "or leave train.cuda_graph false on CPU")
    _check_devices(cfg.ray)
    if cfg.fault.kill_in == "flush" and cfg.fault.kill_rank != 0:
        raise ConfigError("fault.kill_rank", cfg.fault.kill_rank, "must be 0 with fault.kill_in: flush (rank 0 alone writes)")
    if cfg.data.train_limit is not None and cfg.data.train_limit < batch:
        raise ConfigError("data.train_limit", cfg.data.train_limit, f"must be >= train.batch_size={batch}")
    return cfg


def _check_devices(ray: RayConfig) -> None:
    """GPU shares and backends that cannot run together, refused before any worker starts."""
    if not ray.use_gpu:
        if ray.backend == "nccl":
            raise ConfigError("ray.backend", "nccl", "NCCL needs GPU workers: set ray.use_gpu: true, or use auto or gloo")
        if ray.gpus_per_worker != 1.0:
            raise ConfigError("ray.gpus_per_worker", ray.gpus_per_worker, "applies to GPU workers only: set ray.use_gpu: true")
    if ray.gpus_per_worker > 1:
        raise ConfigError("ray.gpus_per_worker", ray.gpus_per_worker, "must be in (0, 1]: a worker uses one device")
    if ray.use_gpu and ray.gpus_per_worker < 1 and ray.num_workers > 1 and ray.backend != "gloo":
        raise ConfigError("ray.backend", ray.backend, f"workers sharing a GPU (ray.gpus_per_worker = "
                          f"{ray.gpus_per_worker}) need gloo: NCCL refuses two ranks on one device; set ray.backend: gloo")


def read_raw(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """A YAML file (a mapping) merged with `key=value` overrides: the raw input of a run or sweep."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError("<config file>", str(path), f"cannot be read: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError("<config file>", str(path), f"is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError("<config file>", str(path), "must be a YAML mapping")
    return merge(raw, parse_overrides(list(overrides)))


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    return build_config(read_raw(path, overrides))


def dump_yaml(d: dict) -> str:
    return yaml.safe_dump(d, sort_keys=False)

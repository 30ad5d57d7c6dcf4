import dataclasses
import math

import numpy as np
import pytest
import torch

from distnet import choices, data, metrics, registry, schema, sharding, worker
from distnet.config import Member, build_config
from distnet.model import PopulationMLP, init_theta

from conftest import RecordingSink

N = 1000
# Expected weight std of each scheme on an n_in x n_out layer, written out from the formulas.
EXPECTED_STD = {
    "nielsen": lambda i, o: 1.0,
    "nielsen_scaled": lambda i, o: 1 / math.sqrt(i),
    "uniform_sqrt_n": lambda i, o: (1 / math.sqrt(i)) / math.sqrt(3),
    "xavier_normal": lambda i, o: math.sqrt(2 / (i + o)),
    "xavier_uniform": lambda i, o: math.sqrt(6 / (i + o)) / math.sqrt(3),
    "he_normal": lambda i, o: math.sqrt(2 / i),
    "he_uniform": lambda i, o: math.sqrt(6 / i) / math.sqrt(3),
    "lecun_normal": lambda i, o: 1 / math.sqrt(i),
    "orthogonal": lambda i, o: 1 / math.sqrt(max(i, o)),  # min(i, o) orthonormal vectors of max(i, o) entries
}


def test_every_init_is_checked():
    assert set(EXPECTED_STD) == set(registry.INITS)


@pytest.mark.parametrize("name", sorted(EXPECTED_STD))
def test_init_std_matches_formula(name):
    g = torch.Generator().manual_seed(0)
    w, b = registry.init_layer(name, N, N, g, sigma_w=1.0, sigma_b=None)
    expected = EXPECTED_STD[name](N, N)
    assert abs(w.std().item() / expected - 1) < 0.05
    assert abs(w.mean().item()) < 0.05 * expected * 10
    assert abs(b.std().item() - choices.INITS[name].bias_std) < 0.1


@pytest.mark.parametrize("name", sorted(EXPECTED_STD))
def test_init_uses_fan_in_and_fan_out_the_right_way_round(name):
    """A 2000 -> 200 layer: a scheme that swapped n_in and n_out would be off by sqrt(10) (or more)."""
    n_in, n_out = 2000, 200
    w, b = registry.init_layer(name, n_in, n_out, torch.Generator().manual_seed(1), sigma_w=1.0, sigma_b=None)
    assert w.shape == (n_in, n_out) and b.shape == (n_out,)
    expected, swapped = EXPECTED_STD[name](n_in, n_out), EXPECTED_STD[name](n_out, n_in)
    assert abs(w.std().item() / expected - 1) < 0.02  # 400k draws: the estimate is good to ~0.2%
    if abs(swapped / expected - 1) > 0.1:
        assert abs(w.std().item() / swapped - 1) > 0.1


def test_orthogonal_is_orthogonal_and_sigmas_scale():
    g = torch.Generator().manual_seed(0)
    w, _ = registry.init_layer("orthogonal", 200, 50, g, 1.0, None)
    assert torch.allclose(w.T @ w, torch.eye(50), atol=1e-5)
    w2, b2 = registry.init_layer("he_normal", N, N, torch.Generator().manual_seed(0), sigma_w=3.0, sigma_b=0.5)
    w1, _ = registry.init_layer("he_normal", N, N, torch.Generator().manual_seed(0), 1.0, None)
    assert torch.allclose(w2, 3 * w1) and abs(b2.std().item() - 0.5) < 0.05


# ------------------------------------------------------------- gradient norms vs hand backprop
def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def numpy_backprop_norms(theta_row, sizes, x, y, loss):
    """Textbook backprop (Nielsen ch. 2) of a sigmoid MLP in float64; returns [|gW1|, |gb1|, ...]."""
    Ws, bs, off = [], [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        Ws.append(theta_row[off:off + n_in * n_out].reshape(n_out, n_in).T); off += n_in * n_out
        bs.append(theta_row[off:off + n_out]); off += n_out
    acts, zs = [x], []
    for W, b in zip(Ws, bs):
        zs.append(acts[-1] @ W + b)
        acts.append(sigmoid(zs[-1]))
    onehot = np.eye(sizes[-1])[y]
    if loss == "softmax_ce":
        e = np.exp(zs[-1] - zs[-1].max(1, keepdims=True))
        delta = e / e.sum(1, keepdims=True) - onehot
    else:  # sigmoid_bce: Nielsen's CrossEntropyCost.delta = a - y
        delta = acts[-1] - onehot
    delta = delta / len(x)  # mean over the batch
    norms = []
    for l in range(len(Ws) - 1, -1, -1):
        gW, gb = acts[l].T @ delta, delta.sum(0)
        norms = [np.linalg.norm(gW), np.linalg.norm(gb)] + norms
        if l:
            delta = (delta @ Ws[l].T) * acts[l] * (1 - acts[l])
    return np.array(norms)


SIZES = [784, 30, 30, 10]


def members(n):
    inits = ["nielsen", "xavier_normal", "he_uniform", "orthogonal"]
    return [Member(inits[k % 4], 1.0 + 0.5 * k, None, seed=10 + k, lr=0.1 * (k + 1)) for k in range(n)]


@pytest.mark.parametrize("loss", ["softmax_ce", "sigmoid_bce"])
def test_grad_norms_match_hand_backprop_float64(mnist, loss):
    x = mnist.train_x[:128].astype(np.float64) / 255
    y = mnist.train_y[:128]
    model = PopulationMLP(SIZES, "sigmoid", loss, init_theta(SIZES, members(3))).to(torch.float64)
    model.loss_and_grad(torch.from_numpy(x), torch.from_numpy(y))
    ours = model.segment_norms(model.grad).numpy()
    for k in range(3):
        ref = numpy_backprop_norms(model.theta[k].detach().numpy(), SIZES, x, y, loss)
        np.testing.assert_allclose(ours[k], ref, rtol=1e-6)


@pytest.mark.parametrize("activation", sorted(registry.ACTIVATIONS))
@pytest.mark.parametrize("loss", sorted(registry.LOSSES))
def test_backprop_equals_autograd_for_every_activation_and_loss(mnist, activation, loss):
    """The loop's written-out backprop against torch.autograd of the same loss, float64, 3 members."""
    x = torch.from_numpy(mnist.train_x[:64].astype(np.float64) / 255)
    y = torch.from_numpy(mnist.train_y[:64])
    model = PopulationMLP(SIZES, activation, loss, init_theta(SIZES, members(3))).to(torch.float64)
    ours = model.loss_and_grad(x, y)
    theta = model.theta.clone().requires_grad_(True)
    ref_loss = model.loss_fn(model.forward(x, theta=theta), y)
    (ref,) = torch.autograd.grad(ref_loss.sum(), theta)  # members are independent: sum splits
    torch.testing.assert_close(ours, ref_loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(model.grad, ref, rtol=1e-7, atol=1e-8 * float(ref.abs().max()))
    assert ref.abs().sum() > 0


def test_worker_logs_the_hand_backprop_norms_at_step_0(mnist):
    """The loop's own step-0 records (float32, first global batch) against float64 backprop."""
    cfg = build_config({"model": {"sizes": SIZES, "init": "xavier_normal"}, "seed": 3,
                        "train": {"epochs": 1, "max_steps": 2}, "ray": {"num_workers": 1},
                        "data": {"train_limit": 1280, "eval_limit": 100}})
    arrays = data.select(mnist, "test", 1280, 100)
    sink = RecordingSink()
    worker.train(cfg, arrays, worker.WorkerEnv(), sink)
    idx = sharding.epoch_batches(1280, 128, 1, 0, 0, 1)[0].numpy()
    theta0 = init_theta(SIZES, cfg.members)[0].double().numpy()
    ref = numpy_backprop_norms(theta0, SIZES, arrays["train_x"][idx] / 255.0, arrays["train_y"][idx], "softmax_ce")
    names = metrics.grad_norm_names(3)
    step0 = [v for s, v in sink.logged if s == 0 and names[0] in v][0]
    np.testing.assert_allclose([step0[n][0] for n in names], ref, rtol=1e-4)
    assert [s for s, _ in sink.series(names[0])] == [0, 1]


def test_worker_records_every_steps_batch_loss_and_accuracy_before_its_update(mnist):
    """train/batch_acc and train/batch_loss of every step against a replay of plain SGD that takes
    the accuracy from the logits' argmax itself: each step's batch, scored before its update."""
    ms = members(3)
    cfg = build_config({"model": {"sizes": SIZES, "activation": "tanh"}, "population": [vars(m) for m in ms],
                        "train": {"epochs": 1, "max_steps": 8, "log_every": 3}, "ray": {"num_workers": 1},
                        "data": {"train_limit": 1280, "eval_limit": 100}})
    arrays = data.select(mnist, "test", 1280, 100)
    sink = RecordingSink()
    worker.train(cfg, arrays, worker.WorkerEnv(), sink)
    model = PopulationMLP(SIZES, "tanh", "softmax_ce", init_theta(SIZES, cfg.members))
    lr = torch.tensor([m.lr for m in ms]).unsqueeze(1)
    x, y = torch.tensor(arrays["train_x"]) / 255.0, torch.tensor(arrays["train_y"])
    for step, idx in enumerate(sharding.epoch_batches(1280, 128, 1, 0, 0, 1)[:8]):
        z = model.forward(x[idx]).detach().numpy()
        acc = (z.argmax(-1) == y[idx].numpy()).mean(1)
        loss = model.loss_and_grad(x[idx], y[idx])
        model.theta.sub_(lr * model.grad)
        recorded_step, row = sink.steps[step]
        assert recorded_step == step
        np.testing.assert_array_equal(row[schema.BATCH_ACC], acc.astype(np.float32))
        np.testing.assert_allclose(row[schema.BATCH_LOSS], loss.numpy(), rtol=1e-6)
    assert len(sink.steps) == 8 and len(set(sink.steps[0][1][schema.BATCH_ACC])) > 1  # members differ


# ------------------------------------------------------------- populations
def run_loop(mnist, raw):
    cfg = build_config(raw)
    arrays = data.select(mnist, "test", cfg.data.train_limit, cfg.data.eval_limit)
    return worker.train(cfg, arrays, worker.WorkerEnv(), None).theta


def test_member_k_of_population_equals_solo_run(mnist):
    base = {"model": {"sizes": SIZES, "activation": "tanh"}, "train": {"epochs": 1, "max_steps": 20, "momentum": 0.5,
            "l2": 5.0}, "ray": {"num_workers": 1}, "data": {"train_limit": 2560, "eval_limit": 100}}
    ms = members(4)
    pop = run_loop(mnist, {**base, "population": [vars(m) for m in ms]})
    for k, m in enumerate(ms):
        solo_raw = {**base, "seed": m.seed, "model": {**base["model"], "init": m.init, "sigma_w": m.sigma_w},
                    "train": {**base["train"], "lr": m.lr}}
        solo = run_loop(mnist, solo_raw)
        assert solo.shape == (1, pop.shape[1])
        torch.testing.assert_close(pop[k], solo[0], atol=1e-5, rtol=0)
    assert not torch.allclose(pop[0], pop[1])


def test_nielsen_probe_ratio_at_init(mnist):
    """Nielsen ch. 5: [784,30,30,10] at init, bias-gradient norms 0.07 and 0.31 (ratio ~4.4)."""
    cfg = build_config({"nielsen": True, "model": {"sizes": SIZES}, "population": [{"seed": s} for s in range(10)]})
    x = torch.tensor(mnist.train_x[:1000]).float() / 256
    y = torch.from_numpy(mnist.train_y[:1000])
    model = PopulationMLP(SIZES, "sigmoid", "sigmoid_bce", init_theta(SIZES, cfg.members))
    out = metrics.probe(model, x, y)
    ratio = out["speed/layer_2"].mean() / out["speed/layer_1"].mean()
    assert 3 < ratio < 7, ratio
    assert 0.02 < out["speed/layer_1"].mean() < 0.2
    # N(0, 1/n_in) weights keep layer 1 out of saturation; N(0, 1) weights saturate most of it.
    assert out["act/saturated/layer_1"].max() < 0.05
    unscaled = [dataclasses.replace(m, init="nielsen") for m in cfg.members]
    big = PopulationMLP(SIZES, "sigmoid", "sigmoid_bce", init_theta(SIZES, unscaled))
    assert metrics.probe(big, x, y)["act/saturated/layer_1"].min() > 0.5


def test_saturation_definitions():
    z = torch.tensor([-10.0, -1.0, 0.0, 1.0, 10.0])
    frac = {n: registry.ACTIVATIONS[n].saturated(z, registry.ACTIVATIONS[n].fn(z)).tolist()
            for n in ["sigmoid", "tanh", "relu", "identity"]}
    assert frac["sigmoid"] == [True, False, False, False, True]
    assert frac["tanh"] == [True, False, False, False, True]
    assert frac["relu"] == [True, True, True, False, False]
    assert frac["identity"] == [False] * 5


# ------------------------------------------------------------- the Jacobian's spectrum
def test_jacobian_spectrum_equals_autograds_of_the_hidden_stack(mnist):
    """metrics.jacobian against torch.autograd's Jacobian of x^1 -> x^L (the hidden stack past the
    first layer), written here from each member's own weights, at the same images: every moment of
    every member. A member whose weights moved as well as one at init."""
    cfg = build_config({"model": {"depth": 4, "width": 40, "activation": "tanh"},
                        "population": [{"init": "lecun_normal", "seed": 0}, {"init": "orthogonal", "seed": 1}]})
    model = PopulationMLP(cfg.sizes, "tanh", "softmax_ce", init_theta(cfg.sizes, cfg.members))
    model.theta[1] += 0.05 * torch.randn(model.theta.shape[1], generator=torch.Generator().manual_seed(0))
    x = torch.tensor(mnist.test_x[:3], dtype=torch.float32) / 255.0
    got = metrics.jacobian(model, x)
    act = registry.ACTIVATIONS["tanh"]
    for k in range(2):
        (w1, b1), *square, _ = [(w[k].double(), b[k, :, 0].double()) for w, b in model.params]
        moments, spectrum, q_in = [], [], []
        for image in x.double():
            x1 = act.fn(w1 @ image + b1)
            q_in.append(float((w1 @ image + b1).square().mean()))

            def stack(h):
                for w, b in square:
                    h = act.fn(w @ h + b)
                return h

            sq = torch.linalg.svdvals(torch.autograd.functional.jacobian(stack, x1)) ** 2
            moments.append([sq.mean(), (sq**2).mean() / sq.mean() ** 2 - 1, sq.max()])
            spectrum += sq.tolist()
        want = np.mean(np.array(moments, dtype=float), axis=0)
        # rtol 1e-6: the slopes come from the model's own float32 forward pass, the products are float64
        np.testing.assert_allclose([got[f"jacobian/{m}"][k] for m in ("mean", "spread", "max")], want, rtol=1e-6)
        np.testing.assert_allclose(got["jacobian/q_in"][k], np.mean(q_in), rtol=1e-6)
        # the smallest singular values feel the float32 slopes most (1.4e-6 relative here)
        np.testing.assert_allclose([got[schema.quantile_name(p)][k] for p in schema.JACOBIAN_QUANTILES],
                                   np.percentile(spectrum, schema.JACOBIAN_QUANTILES), rtol=1e-5)
    assert metrics.jacobian(PopulationMLP([784, 40, 10], "tanh", "softmax_ce",
                                          init_theta([784, 40, 10], cfg.members)), x) == {}  # no square part


def test_worker_logs_the_jacobian_spectrum_at_init_and_each_epoch_only_when_asked(mnist):
    raw = {"model": {"depth": 3, "width": 30, "activation": "tanh"}, "seed": 2, "ray": {"num_workers": 1},
           "train": {"epochs": 2, "probe_size": 50}, "data": {"train_limit": 640, "eval_limit": 100}}
    arrays = data.select(mnist, "test", 640, 100)
    sinks = {}
    for on in (False, True):
        cfg = build_config({**raw, "train": {**raw["train"], "jacobian": on}})
        sinks[on] = RecordingSink()
        out = worker.train(cfg, arrays, worker.WorkerEnv(), sinks[on])
    assert not any(k.startswith("jacobian/") for _, v in sinks[False].logged for k in v)
    assert [s for s, _ in sinks[True].series("jacobian/spread")] == [0, 1, 2]  # init and each epoch's end
    at_init = metrics.jacobian(PopulationMLP(cfg.sizes, "tanh", "softmax_ce", init_theta(cfg.sizes, cfg.members)),
                               torch.tensor(arrays["train_x"][:metrics.JACOBIAN_INPUTS], dtype=torch.float32) / 255.0)
    at_end = metrics.jacobian(PopulationMLP(cfg.sizes, "tanh", "softmax_ce", out.theta.clone()),
                              torch.tensor(arrays["train_x"][:metrics.JACOBIAN_INPUTS], dtype=torch.float32) / 255.0)
    for (step, logged), want in zip(sinks[True].series("jacobian/mean")[::2], (at_init, at_end)):
        np.testing.assert_allclose(logged, want["jacobian/mean"], rtol=1e-6, err_msg=str(step))

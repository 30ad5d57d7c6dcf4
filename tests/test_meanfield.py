"""Mean-field theory (distnet.meanfield) against known results and against distnet's own networks at
init; the variance form of the gains in configs and sweeps; `distnet meanfield`."""

import math

import numpy as np
import pytest
import torch

from distnet import cli, data, meanfield, registry, sweep
from distnet.config import ConfigError, build_config
from distnet.model import PopulationMLP, init_theta, layer_views, make_layers


def test_tanh_order_to_chaos_at_sigma_b2_005_is_near_1_76():
    """Schoenholz et al. 2017 (fig. 1, and Poole et al. 2016): sigma_w^2 ~ 1.76 at sigma_b^2 = 0.05."""
    crit = meanfield.critical_sigma_w2("tanh", 0.05)
    assert crit == pytest.approx(1.76, abs=0.005)
    assert meanfield.mean_field("tanh", crit, 0.05).chi_1 == pytest.approx(1.0, abs=1e-6)
    ordered, chaotic = meanfield.mean_field("tanh", 1.5, 0.05), meanfield.mean_field("tanh", 2.5, 0.05)
    # chi_c = chi_1 on the ordered side; the two quadratures agree to rounding (one ulp seen apart)
    assert ordered.phase == "ordered" and ordered.c_star == 1.0 and ordered.chi_1 < 1
    assert ordered.chi_c == pytest.approx(ordered.chi_1, rel=1e-12)
    assert chaotic.phase == "chaotic" and 0 < chaotic.c_star < 1 and chaotic.chi_c < 1 < chaotic.chi_1
    for mf in (ordered, chaotic):  # the trainability bound is 6 correlation lengths
        assert mf.max_depth == pytest.approx(-6 / math.log(mf.chi_c), rel=1e-12)
    # xi_c grows without bound towards the transition from both sides.
    xi = [meanfield.mean_field("tanh", s, 0.05).xi_c for s in (1.0, 1.5, 1.7, 1.83, 2.0, 3.0)]
    assert xi[0] < xi[1] < xi[2] and xi[3] > xi[4] > xi[5] and min(xi[2], xi[3]) > 30
    # c* is a fixed point of the correlation map, to the bisection's precision.
    g = meanfield.Gauss("tanh")
    assert meanfield.c_map(g, chaotic.q_star, chaotic.c_star, 2.5, 0.05) == pytest.approx(chaotic.c_star, abs=1e-9)


def test_relu_and_identity_have_their_closed_forms():
    # relu: chi_1 = sigma_w^2 / 2 at any q (half the Gaussian mass is on the slope-1 side): critical at 2.
    assert meanfield.critical_sigma_w2("relu", 0.0) == pytest.approx(2.0, abs=1e-9)
    for s in (1.0, 1.5, 1.9):
        mf = meanfield.mean_field("relu", s, 0.1)
        assert mf.chi_1 == pytest.approx(s / 2, rel=1e-12)
        assert mf.q_star == pytest.approx(0.1 / (1 - s / 2), rel=1e-9)  # q = s q / 2 + sigma_b^2
    # identity: q* = sigma_b^2 / (1 - sigma_w^2), chi_1 = sigma_w^2, xi_c = -1 / ln sigma_w^2.
    mf = meanfield.mean_field("identity", 0.8, 0.05)
    assert (mf.q_star, mf.chi_1, mf.xi_c) == pytest.approx((0.25, 0.8, -1 / math.log(0.8)), rel=1e-9)


@pytest.mark.parametrize("sigma_w2", [1.5, 4.0])
def test_q_star_and_c_star_match_a_deep_wide_distnet_network_at_init(sigma_w2):
    """The model distnet trains, built from a config in the variance form, 60 tanh layers of 1000 on
    256 MNIST images: the mean of h^2 over the last 10 hidden layers is q*, and on the chaotic side
    the mean correlation between two images' pre-activations is c* (MNIST's images start far more
    alike, c ~ 0.8, and approach c* as exp(-layer / xi_c): xi_c = 7 at sigma_w^2 = 4, so the
    gap left after 50 layers is below 1e-3)."""
    cfg = build_config({"model": {"depth": 60, "width": 1000, "activation": "tanh", "init": "lecun_normal",
                                  "sigma_w2": sigma_w2, "sigma_b2": 0.05}})
    model = PopulationMLP(cfg.sizes, "tanh", "softmax_ce", init_theta(cfg.sizes, cfg.members))
    arrays = data.select(data.load_mnist(), "test", 256, 10)
    x = torch.tensor(arrays["train_x"], dtype=torch.float32) / 255.0
    with torch.no_grad():
        _, hidden = model.forward(x, keep_hidden=True)
    h = torch.stack([z[0] for z, _ in hidden[-10:]]).double()  # [10 layers, 1000 units, 256 images]
    mf = meanfield.mean_field("tanh", sigma_w2, 0.05)
    assert float(h.pow(2).mean()) == pytest.approx(mf.q_star, rel=0.03)
    if mf.phase == "chaotic":
        corr = torch.einsum("lui,luj->lij", h, h) / h.shape[1] / mf.q_star  # [layers, images, images]
        off = corr[:, ~torch.eye(256, dtype=torch.bool)]
        assert float(off.mean()) == pytest.approx(mf.c_star, abs=0.02)


TANH_CRITICAL = ("tanh", 1.7610, 0.05)  # chi_1 = 1 at sigma_b^2 = 0.05 (the first test)
ON_THE_CRITICAL_LINE = [("identity", 1.0, 0.0), ("relu", 2.0, 0.0), TANH_CRITICAL]


def test_jacobian_spectrum_has_its_closed_forms():
    """Linear nets: Gaussian weights spread J J^T's eigenvalues by L (a product of L Ginibre
    matrices: Fuss-Catalan, m2 = L + 1), orthogonal ones not at all; ReLU's phi'^2 is 0 or 1, half
    each (mu_2 / mu_1^2 = 2): 2L and L. The mean is chi_1^L on either side of chi_1 = 1."""
    for depth in (1, 8, 32):
        spread = {(act, w): meanfield.jacobian_spectrum(act, s2, b2, depth, w).spread
                  for act, s2, b2 in ON_THE_CRITICAL_LINE[:2] for w in ("gaussian", "orthogonal")}
        assert spread == pytest.approx({("identity", "gaussian"): depth, ("identity", "orthogonal"): 0,
                                        ("relu", "gaussian"): 2 * depth, ("relu", "orthogonal"): depth}, rel=1e-6)
    for s2 in (1.5, 2.0, 2.5):
        assert meanfield.jacobian_spectrum("relu", s2, 0.0, 8, "gaussian").mean == pytest.approx((s2 / 2) ** 8, rel=1e-9)
        assert meanfield.jacobian_spectrum("identity", s2, 0.0, 8, "orthogonal").mean == pytest.approx(s2**8, rel=1e-12)
    with pytest.raises(ValueError, match="allowed gaussian, orthogonal"):
        meanfield.jacobian_spectrum("tanh", 1.0, 0.05, 8, "uniform")


def measured_spectra(activation: str, sigma_w2: float, sigma_b2: float, depths: tuple[int, ...], init: str,
                     seed: int, width: int = 400, q_in: float | None = None) -> list[tuple[float, float]]:
    """For each of `depths`: (mean, variance over mean squared) of the eigenvalues of J J^T for a
    distnet net of that depth at init, from a config in the variance form: J = D_{L+1} W_{L+1} ...
    D_2 W_2, its L square hidden layers, at a first hidden pre-activation h^1 drawn at q* (where the
    theory has every layer), or at q_in. One net of the largest depth serves them all: a shallower
    net of the same seed draws the same first layers (checked in the test below)."""
    cfg = build_config({"model": {"depth": max(depths) + 1, "width": width, "activation": activation, "init": init,
                                  "sigma_w2": sigma_w2, "sigma_b2": sigma_b2}, "seed": seed})
    views = layer_views(make_layers(cfg.sizes), init_theta(cfg.sizes, cfg.members).double())
    act = registry.ACTIVATIONS[activation]
    q = meanfield.length_fixed_point(meanfield.Gauss(activation), sigma_w2, sigma_b2)[1] if q_in is None else q_in
    h = torch.randn(width, 1, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64) * math.sqrt(q)
    jac = torch.eye(width, dtype=torch.float64)
    out = []
    for layer, (w, b) in enumerate(views[1:max(depths) + 1], start=1):  # W_2 .. W_{L+1}, square
        h = w[0] @ act.fn(h) + b[0]
        jac = act.grad(h, act.fn(h)) * (w[0] @ jac)
        if layer in depths:
            jjt = jac @ jac.T
            m1, m2 = float(torch.trace(jjt)) / width, float(jjt.pow(2).sum()) / width
            out.append((m1, m2 / m1**2 - 1))
    return out


def test_a_shallower_net_is_the_first_layers_of_a_deeper_one():
    """What lets measured_spectra read depth 8 off a depth-32 net: the same seed draws the same
    first layers, whatever the depth (the init draws layer by layer)."""
    for init in ("orthogonal", "lecun_normal"):
        nets = [build_config({"model": {"depth": d, "width": 50, "init": init, "sigma_w2": 1.7}, "seed": 3}) for d in (3, 9)]
        shallow, deep = (init_theta(c.sizes, c.members)[0] for c in nets)
        cut = 784 * 50 + 50 + 2 * (50 * 50 + 50)  # the first layer and two hidden ones, weights and biases
        assert torch.equal(shallow[:cut], deep[:cut])


@pytest.mark.parametrize("activation,sigma_w2,sigma_b2", ON_THE_CRITICAL_LINE)
@pytest.mark.parametrize("weights,init", [("gaussian", "lecun_normal"), ("orthogonal", "orthogonal")])
def test_jacobian_spectrum_matches_distnet_nets_at_init(activation, sigma_w2, sigma_b2, weights, init):
    """The predicted mean and spread against distnet's own random nets, width 400, averaged over 16
    seeds (the spread of one net is itself random, more so with depth): within 10 % at depth 8 and
    20 % at depth 32, as the issue asks. Measured with these seeds: the spreads within 1.9 % at depth
    8 and 3.3 % at depth 32, the means within 5.5 % and 6.7 % (with 8 seeds a mean was 8 % off)."""
    measured = np.mean([measured_spectra(activation, sigma_w2, sigma_b2, (8, 32), init, s) for s in range(16)], axis=0)
    for (depth, tol), (mean, spread) in zip(((8, 0.10), (32, 0.20)), measured):
        predicted = meanfield.jacobian_spectrum(activation, sigma_w2, sigma_b2, depth, weights)
        assert mean == pytest.approx(predicted.mean, rel=tol), (depth, "mean")
        assert spread == pytest.approx(predicted.spread, rel=tol, abs=1e-9), (depth, "spread")


def test_jacobian_spectrum_from_an_input_length_has_its_closed_forms():
    """At q_in = q* the layer-by-layer prediction is the one at q*; linear and ReLU nets' slopes do not
    depend on the length, so neither does their prediction."""
    for act, s2, b2 in ON_THE_CRITICAL_LINE:
        q_star = meanfield.length_fixed_point(meanfield.Gauss(act), s2, b2)[1]
        for w in ("gaussian", "orthogonal"):
            at_q_star = meanfield.jacobian_spectrum(act, s2, b2, 16, w)
            assert meanfield.jacobian_spectrum(act, s2, b2, 16, w, q_in=q_star) == \
                meanfield.Spectrum(pytest.approx(at_q_star.mean, rel=1e-9), pytest.approx(at_q_star.spread, rel=1e-9))
    for q_in in (0.01, 0.3, 3.0):
        assert meanfield.jacobian_spectrum("identity", 1.3, 0.0, 8, "orthogonal", q_in) == \
            meanfield.Spectrum(pytest.approx(1.3**8, rel=1e-12), pytest.approx(0, abs=1e-12))
        assert meanfield.jacobian_spectrum("relu", 2.0, 0.0, 8, "gaussian", q_in) == \
            meanfield.Spectrum(pytest.approx(1, rel=1e-9), pytest.approx(16, rel=1e-9))


@pytest.mark.parametrize("sigma_w2,sigma_b2,q_in", [(1.08603, 1e-4, 0.116), (1.76095, 0.05, 0.238)])
def test_jacobian_spectrum_from_an_input_length_matches_distnet_nets(sigma_w2, sigma_b2, q_in):
    """Critical tanh fed pre-activations of MNIST's length (q_in = sigma_w^2 |x|^2 / 784 + sigma_b^2, |x|^2 / 784
    = 0.107 on the 8 probe images), not q* (0.046 and 0.57): the measured mean is where the length map's
    transient puts it, within 10 % at depth 8 and 20 % at 32, and 25 % or more off the prediction at q*."""
    measured = np.mean([measured_spectra("tanh", sigma_w2, sigma_b2, (8, 32), "orthogonal", s, q_in=q_in)
                        for s in range(16)], axis=0)
    for (depth, tol), (mean, spread) in zip(((8, 0.10), (32, 0.20)), measured):
        predicted = meanfield.jacobian_spectrum("tanh", sigma_w2, sigma_b2, depth, "orthogonal", q_in)
        assert mean == pytest.approx(predicted.mean, rel=tol), (depth, "mean")
        assert spread == pytest.approx(predicted.spread, rel=tol, abs=0.02), (depth, "spread")
        assert abs(mean / meanfield.jacobian_spectrum("tanh", sigma_w2, sigma_b2, depth, "orthogonal").mean - 1) > 0.25


def test_variance_form_of_the_gains():
    cfg = build_config({"model": {"sizes": [784, 2000, 10], "init": "lecun_normal", "sigma_w2": 1.76,
                                  "sigma_b2": 0.05}})
    m = cfg.members[0]
    assert (m.sigma_w ** 2, m.sigma_b ** 2) == pytest.approx((1.76, 0.05), rel=1e-15)
    theta = init_theta(cfg.sizes, cfg.members)[0].double()
    w1, b1 = theta[:784 * 2000], theta[784 * 2000:784 * 2000 + 2000]
    assert float(w1.var()) * 784 == pytest.approx(1.76, rel=0.01)  # W ~ N(0, sigma_w^2 / n_in)
    assert float(b1.var()) == pytest.approx(0.05, rel=0.07)  # 2000 draws: 3 standard errors
    pop = build_config({"model": {"sizes": [784, 10]}, "population": [{"sigma_w2": 4.0}, {"sigma_b2": 0.25}]})
    assert [(m.sigma_w, m.sigma_b) for m in pop.members] == [(2.0, None), (1.0, 0.5)]
    with pytest.raises(ConfigError, match="model.sigma_w2.*not both"):
        build_config({"model": {"sizes": [784, 10], "sigma_w": 1.0, "sigma_w2": 1.0}})
    with pytest.raises(ConfigError, match=r"population\[0\].sigma_b2.*>= 0"):
        build_config({"model": {"sizes": [784, 10]}, "population": [{"sigma_b2": -1}]})
    with pytest.raises(ConfigError, match="model.sigma_w2.*> 0"):
        build_config({"model": {"sizes": [784, 10], "sigma_w2": 0}})


def test_meanfield_sweep_packs_sigma_and_seed_into_one_training_per_depth():
    sw = sweep.load_sweep("configs/meanfield_tanh.yaml")
    packs = sweep.packs(sw.cells, sw.settings.pack)
    assert len(sw.cells) == 140 and len(packs) == 7
    for p in packs:
        assert len({c.config.model.depth for c in p}) == 1
        assert sorted({round(c.config.members[0].sigma_w ** 2, 12) for c in p}) == sw.grid["model.sigma_w2"]
    assert all(c.config.members[0].sigma_b ** 2 == pytest.approx(0.05) and c.config.members[0].init == "lecun_normal"
               for c in sw.cells)
    big = sweep.load_sweep("configs/meanfield_tanh.yaml", ["model.width=300", "grid.model.depth=[100,300]"])
    assert {c.config.sizes[1] for c in big.cells} == {300} and {c.config.model.depth for c in big.cells} == {100, 300}


def test_meanfield_command_prints_the_function_values(capsys):
    assert cli.main(["meanfield", "--sigma-w2", "1:4:4", "1.76", "--sigma-b2", "0.05"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {float(line.split()[0]): line.split() for line in out if line[:9].strip().replace(".", "").isdigit()}
    assert sorted(rows) == [1.0, 1.76, 2.0, 3.0, 4.0]
    for s, cols in rows.items():
        mf = meanfield.mean_field("tanh", s, 0.05)
        q, c, chi, xi, bound = map(float, cols[2:7])
        np.testing.assert_allclose([q, c, chi, xi, bound], [mf.q_star, mf.c_star, mf.chi_1, mf.xi_c, mf.max_depth],
                                   rtol=1e-3)
        assert cols[7] == mf.phase
    assert "order to chaos (chi_1 = 1) at sigma_w^2 = 1.7610 for sigma_b^2 = 0.05" in out
    # --depth: the Jacobian's predicted spectrum for each sigma_w^2, both weight ensembles
    assert cli.main(["meanfield", "--activation", "relu", "--sigma-w2", "1.5", "2", "--sigma-b2", "0", "--depth", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    spectra = [line.split() for line in out[out.index(next(l for l in out if l.startswith("the Jacobian of 8"))) + 2:]]
    np.testing.assert_allclose([list(map(float, row)) for row in spectra], [[1.5, 0.75**8, 16, 8], [2, 1, 16, 8]],
                               rtol=1e-3)
    # --q-in: the layers fed from a given length (tanh's slopes depend on it)
    assert cli.main(["meanfield", "--sigma-w2", "1.08603", "--sigma-b2", "0.0001", "--depth", "8", "--q-in", "0.116"]) == 0
    out = capsys.readouterr().out.splitlines()
    (row,) = [line.split() for line in out[out.index(next(l for l in out if l.startswith("the Jacobian of 8"))) + 2:]]
    want = [meanfield.jacobian_spectrum("tanh", 1.08603, 1e-4, 8, w, q_in=0.116) for w in ("gaussian", "orthogonal")]
    np.testing.assert_allclose(list(map(float, row)), [1.08603, want[0].mean, want[0].spread, want[1].spread], rtol=1e-3)
    assert want[0].mean < 0.7  # not q*'s 1: the test tells the two apart
    with pytest.raises(SystemExit) as e:
        cli.main(["meanfield", "--sigma-w2", "-1"])
    assert e.value.code == 2

"""Mean-field theory (distnet.meanfield) against known results and against distnet's own networks at
init; the variance form of the gains in configs and sweeps; `distnet meanfield`."""

import math

import numpy as np
import pytest
import torch

from distnet import cli, data, meanfield, sweep
from distnet.config import ConfigError, build_config
from distnet.model import PopulationMLP, init_theta


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
    with pytest.raises(SystemExit) as e:
        cli.main(["meanfield", "--sigma-w2", "-1"])
    assert e.value.code == 2

"""The test-time rule on a whole network against the Monte Carlo ensemble (minisd.ensemble)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import dev, host, randomise_batch_norm

from minisd import data, ensemble, models


def tiny(scale="eval", schedule="linear", final_survival=0.5, dtype="float64"):
    model = models.resnet_cifar(depth=14, in_channels=1, schedule=schedule, final_survival=final_survival,
                                scale=scale, seed=0, dtype=dtype)
    rng = np.random.default_rng(1)
    randomise_batch_norm(model, rng)
    for m in model.modules():  # running statistics that are not 0 and 1, as after training
        if "running_mean" in m.buffers:
            m.buffers["running_mean"][...] = dev(rng.normal(0.0, 0.3, m.num_features))
            m.buffers["running_var"][...] = dev(rng.uniform(0.5, 2.0, m.num_features))
    return model


@pytest.fixture
def images():
    return dev(np.random.default_rng(2).standard_normal((6, 1, 8, 8)))


def test_softmax_rows_sum_to_one_and_survive_large_logits():
    p = ensemble.softmax(dev(np.array([[1000.0, 0.0], [0.0, 0.0]])))
    np.testing.assert_allclose(p, [[1.0, 0.0], [0.5, 0.5]])


def test_constant_depth_makes_the_three_outputs_one(images):
    model = tiny(schedule="none")
    own = ensemble.deterministic_probs(model, images)
    np.testing.assert_array_equal(own, ensemble.deterministic_probs(model, images, "other"))
    np.testing.assert_allclose(ensemble.monte_carlo_probs(model, images, samples=3), own, rtol=1e-12)


def test_the_other_rule_is_the_rule_forgotten_or_applied_twice(images):
    """eval rule, the other network: branches unscaled, as if every p_l were 1; train rule, the
    other network: branches scaled by p_l, which is the eval rule's network with the same weights."""
    paper = tiny("eval")
    inverted = tiny("train")
    inverted.load_state_dict(paper.state_dict())
    np.testing.assert_allclose(ensemble.deterministic_probs(paper, images, "other"),
                               ensemble.deterministic_probs(inverted, images), rtol=1e-12)
    np.testing.assert_allclose(ensemble.deterministic_probs(inverted, images, "other"),
                               ensemble.deterministic_probs(paper, images), rtol=1e-12)
    assert not np.allclose(ensemble.deterministic_probs(paper, images),
                           ensemble.deterministic_probs(paper, images, "other"))


@pytest.mark.parametrize("scale", ["eval", "train"])
def test_the_ensemble_averages_sub_networks_with_their_training_multipliers(images, scale):
    """Each sample is the sub-network a training step would run (gate kept with probability p_l,
    multiplier 1 or 1/p_l) with batch norm on its running statistics: rebuilt here from the same
    draws with unit survival and the branch weights scaled by hand."""
    model = tiny(scale)
    samples, seed = 4, 7
    rng = np.random.default_rng(seed)
    probs = np.array([b.survival_prob for b in model.blocks])
    expected = 0
    for _ in range(samples):
        keep = rng.random(len(probs)) < probs
        sub = tiny(scale, schedule="none")
        state = {k: host(v).copy() for k, v in model.state_dict().items()}
        for l, (block, kept) in enumerate(zip(model.blocks, keep)):
            prefix = next(name for name, m in model.named_modules() if m is block)
            # The branch ends in a batch norm: scaling its weight and bias scales the branch.
            factor = (1.0 / probs[l] if scale == "train" else 1.0) if kept else 0.0
            for key in ("weight", "bias"):
                state[f"{prefix}.branch.4.{key}"] *= factor
        sub.load_state_dict({k: dev(v) for k, v in state.items()})
        expected = expected + ensemble.deterministic_probs(sub, images)
    got = ensemble.monte_carlo_probs(model, images, samples=samples, seed=seed)
    np.testing.assert_allclose(got, expected / samples, rtol=1e-10, atol=1e-12)


def test_sampling_leaves_the_model_as_it_was(images):
    model = tiny()
    model.train()
    model.force_gates([True, False] * 3)
    state = model.gate_rng.bit_generator.state
    ensemble.monte_carlo_probs(model, images, samples=3)
    ensemble.deterministic_probs(model, images, "other")
    assert model.training and all(m.training for m in model.modules())
    assert [b.forced_gate for b in model.blocks] == [True, False] * 3
    assert [b.scale for b in model.blocks] == ["eval"] * 6
    assert model.gate_rng.bit_generator.state == state


def test_compare_reports_accuracies_and_distances():
    model = tiny(dtype="float32")
    digits = data.load_digits()
    split = digits.test.subset(40).to()
    result = ensemble.compare_test_time_rules(model, split, samples=8, batch_size=16)
    assert result["images"] == 40 and result["samples"] == 8
    for key in ("own", "other", "ensemble"):
        assert 0.0 <= result[key] <= 1.0
    assert 0.0 <= result["own_distance"] <= 1.0 and 0.0 <= result["other_distance"] <= 1.0
    assert 0.0 <= result["own_agreement"] <= 1.0 and 0.0 <= result["other_agreement"] <= 1.0
    # the agreement is with the ensemble's labels: accuracies can differ by at most the disagreement
    assert abs(result["own"] - result["ensemble"]) <= 1 - result["own_agreement"] + 1e-12
    # batches of 16 see the same gate draws as one batch of 40: the ensemble is one ensemble
    whole = ensemble.compare_test_time_rules(model, split, samples=8, batch_size=40)
    assert whole["ensemble"] == result["ensemble"]
    assert whole["own_distance"] == pytest.approx(result["own_distance"], rel=1e-6)


def test_bad_arguments_get_one_line():
    model = tiny()
    with pytest.raises(ValueError, match="rule must be 'own' or 'other'"):
        ensemble.deterministic_probs(model, None, "forgotten")
    with pytest.raises(ValueError, match="samples must be >= 1"):
        ensemble.monte_carlo_probs(model, None, samples=0)

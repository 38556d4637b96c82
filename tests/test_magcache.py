"""MagCache: skip rule, resampling, calibrations, recorder and files, against hand-checked values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from musubi.errors import MusubiError
from musubi.magcache.calibration import expert_part, load_calibration_json
from musubi.magcache.choice import ModelFacts, RunFacts, auto_calibration_key, choose_ratios, run_expert
from musubi.magcache.published import default_calibration, default_key_for, list_default_models
from musubi.magcache.recorder import CalibrationRecorder
from musubi.magcache.resampling import (
    expert_run_ratios,
    per_step_ratios,
    ratios_for_run,
    resample_ratios,
    scaled_switch_step,
)
from musubi.magcache.settings import MagCacheSettings, parse_ratio_string
from musubi.magcache.state import MagCacheState
from musubi.magcache.steps import is_descending, step_for_sigma

torch.set_num_threads(1)


def skipped(state: MagCacheState) -> list[int]:
    """Run every step once and list those skipped."""
    return [step for step in range(state.num_steps) if state.decide(step)]


def settings(threshold=0.24, K=6, retention_ratio=0.2, **more) -> MagCacheSettings:
    return MagCacheSettings(threshold=threshold, K=K, retention_ratio=retention_ratio, **more)


# ---------------------------------------------------------------------------------------------
# musubi compatibility
# ---------------------------------------------------------------------------------------------


def musubi_reference_schedule(ratios, n, rho, threshold, K):
    """musubi's FramePack loop written out plainly: NumPy nearest index, one tick per step."""
    length = len(ratios)
    if n != length:
        indices = np.round(np.arange(n) * (length - 1) / (n - 1)).astype(int)
        ratios = [ratios[i] for i in indices]
    accumulated, error, in_a_row, result = 1.0, 0.0, 0, []
    for step in range(n):
        if step >= max(int(rho * n), 1) and step < n - 1:
            accumulated *= ratios[step]
            error += abs(1 - accumulated)
            in_a_row += 1
            if error <= threshold and in_a_row <= K:
                result.append(step)
                continue
        accumulated, error, in_a_row = 1.0, 0.0, 0
    return result


def test_musubi_default_example_skips_the_published_steps():
    calibration = default_calibration("framepack_musubi_default")
    assert len(calibration.ratios) == 50
    state = MagCacheState(settings(0.24, 6, 0.2), 25, calibration.ratios, resample_method="nearest")
    expected = [5, 6, 7, 9, 10, 11, 13, 14, 15, 16, 18, 19, 20, 21, 22]
    assert skipped(state) == expected
    assert state.computed_steps == 10 and state.skipped_steps == 15
    assert musubi_reference_schedule(list(calibration.ratios), 25, 0.2, 0.24, 6) == expected


@pytest.mark.parametrize("n", [2, 7, 12, 20, 30, 33, 60])
def test_nearest_schedule_matches_the_plain_musubi_loop(n):
    ratios = list(default_calibration("hunyuan_video").ratios)
    state = MagCacheState(settings(0.3, 4, 0.2), n, ratios, resample_method="nearest")
    assert skipped(state) == musubi_reference_schedule(ratios, n, 0.2, 0.3, 4)


@pytest.mark.parametrize("length,n", [(50, 25), (50, 30), (25, 50), (28, 20), (40, 7), (13, 5), (5, 13)])
def test_nearest_resampling_matches_numpy_rounding(length, n):
    values = [1.0 + 0.01 * i for i in range(length)]
    indices = np.round(np.arange(n) * (length - 1) / (n - 1)).astype(int)
    assert resample_ratios(values, n, "nearest") == [values[i] for i in indices]


def test_nearest_single_step_takes_the_last_value():
    assert resample_ratios([1.0, 0.9, 0.8], 1, "nearest") == [0.8]


# ---------------------------------------------------------------------------------------------
# The skip rule, by hand
# ---------------------------------------------------------------------------------------------

# Binary-exact ratios, so E lands exactly on the threshold.
EDGE_RATIOS = [1.0, 1.0, 0.75, 1.0, 1.0, 1.25, 1.0, 1.0]


def test_error_exactly_at_threshold_skips():
    # rho 0.25 of 8 steps: steps 0, 1 computed. Step 2: A .75 E .25 skip; step 3: A .75 E .5 (= θ)
    # skip; step 4: E .75 compute; step 5: A 1.25 E .25 skip; step 6: E .5 skip; step 7 is last.
    state = MagCacheState(settings(0.5, 6, 0.25), 8, EDGE_RATIOS)
    assert skipped(state) == [2, 3, 5, 6]
    assert state.computed_step_indices == [0, 1, 4, 7]


def test_error_just_above_threshold_computes():
    # θ just below .5: step 3 computes and resets; step 4 then has A 1, E 0 and skips;
    # step 5: A 1.25, E .25 skip; step 6: E .5 compute; step 7 last.
    state = MagCacheState(settings(0.4999, 6, 0.25), 8, EDGE_RATIOS)
    assert skipped(state) == [2, 4, 5]


def test_accumulators_follow_the_formula():
    state = MagCacheState(settings(0.5, 6, 0.25), 8, EDGE_RATIOS)
    for step in range(4):
        state.decide(step)
    assert state.accumulated_ratio == 0.75
    assert state.accumulated_error == 0.5
    assert state.skips_in_a_row == 2
    state.decide(4)  # computed: everything resets
    assert (state.accumulated_ratio, state.accumulated_error, state.skips_in_a_row) == (1.0, 0.0, 0)


def test_skips_in_a_row_stop_at_K():
    # Flat curve: only K limits. rho 0.1 of 10: step 0 computed; 1-3 skip (J 1..3), 4 has J 4 > 3.
    state = MagCacheState(settings(0.1, 3, 0.1), 10, [1.0] * 10)
    assert skipped(state) == [1, 2, 3, 5, 6, 7]


def test_threshold_zero_never_skips_even_on_a_flat_curve():
    # A flat curve keeps E at exactly 0, which "E ≤ 0" alone would skip.
    state = MagCacheState(settings(0.0, 6, 0.0), 10, [1.0] * 10)
    assert skipped(state) == []
    assert state.computed_steps == 10


def test_K_zero_never_skips():
    assert skipped(MagCacheState(settings(10.0, 0, 0.0), 10, [1.0] * 10)) == []


def test_threshold_zero_on_a_published_curve_never_skips():
    calibration = default_calibration("wan2.1_t2v_14B")
    state = MagCacheState.for_run(settings(0.0, 6, 0.2), 50, calibration)
    assert skipped(state) == []


@pytest.mark.parametrize("n,rho,first", [(25, 0.2, 5), (10, 0.0, 1), (3, 0.1, 1), (100, 0.29, 29), (10, 0.7, 7)])
def test_retention_and_last_step_always_computed(n, rho, first):
    state = MagCacheState(settings(100.0, 1000, rho), n, [1.0] * n)
    assert skipped(state) == list(range(first, n - 1))


def test_single_step_run_computes():
    assert skipped(MagCacheState(settings(100.0, 1000, 0.0), 1, [1.0])) == []


def test_max_step_deviation_refuses_a_large_single_ratio():
    ratios = [1.0, 1.0, 1.0, 1.125, 1.0, 1.0]
    plain = MagCacheState(settings(1.0, 10, 0.0), 6, ratios)
    assert skipped(plain) == [1, 2, 3, 4]
    strict = MagCacheState(settings(1.0, 10, 0.0, max_step_deviation=0.0625), 6, ratios)
    assert skipped(strict) == [1, 2, 4]


def test_cache_not_ready_computes_and_resets():
    state = MagCacheState(settings(1.0, 10, 0.0), 6, [1.0, 0.75, 0.75, 1.0, 1.0, 1.0])
    assert state.decide(0) is False
    assert state.decide(1) is True
    assert state.decide(2, cache_ready=False) is False
    assert state.accumulated_ratio == 1.0
    assert state.decide(3) is True


# ---------------------------------------------------------------------------------------------
# Runs: idempotence, new runs, jumps
# ---------------------------------------------------------------------------------------------


def test_asking_twice_per_step_changes_nothing():
    once = MagCacheState(settings(0.5, 6, 0.25), 8, EDGE_RATIOS)
    twice = MagCacheState(settings(0.5, 6, 0.25), 8, EDGE_RATIOS)
    expected = skipped(once)
    answers = []
    for step in range(8):
        first = twice.decide(step)
        error = twice.accumulated_error
        assert twice.decide(step) == first  # the uncond pass of the same step
        assert twice.accumulated_error == error
        answers.append(first)
    assert [step for step, skip in enumerate(answers) if skip] == expected
    assert twice.skipped_step_indices == expected
    assert twice.computed_steps + twice.skipped_steps == 8


def test_going_back_to_step_zero_starts_a_new_run():
    state = MagCacheState(settings(0.5, 6, 0.25), 8, EDGE_RATIOS)
    first = skipped(state)
    second = skipped(state)
    assert first == second == [2, 3, 5, 6]
    assert state.computed_steps == 4  # counters belong to the latest run


def test_reset_forgets_a_run_half_way():
    state = MagCacheState(settings(0.5, 6, 0.25), 8, EDGE_RATIOS)
    for step in range(4):
        state.decide(step)
    state.reset()
    assert state.skipped_step_indices == [] and state.accumulated_error == 0.0
    assert skipped(state) == [2, 3, 5, 6]


def test_jump_multiplies_the_ratios_passed_over():
    state = MagCacheState(settings(1.0, 10, 0.0), 6, [1.0, 1.0, 0.75, 0.5, 1.0, 1.0])
    state.decide(0)
    state.decide(1)
    assert state.decide(3) is True  # steps 2 and 3 together: A = .75 × .5
    assert state.accumulated_ratio == 0.375
    assert state.accumulated_error == 0.625


def test_run_starting_past_step_zero_computes_first():
    state = MagCacheState(settings(100.0, 10, 0.0), 6, [1.0] * 6)
    assert state.decide(3) is False
    assert state.decide(4) is True


def test_step_outside_the_run_is_refused():
    state = MagCacheState(settings(), 5, [1.0] * 5)
    with pytest.raises(MusubiError, match="outside the run's 5 steps"):
        state.decide(5)


def test_summary_lists_the_skipped_steps():
    state = MagCacheState(settings(0.5, 6, 0.25), 8, EDGE_RATIOS)
    skipped(state)
    assert state.summary() == "MagCache: skipped 4 of 8 steps (2, 3, 5, 6); 4 full passes."


# ---------------------------------------------------------------------------------------------
# Two experts
# ---------------------------------------------------------------------------------------------


def test_expert_switch_restarts_the_count():
    flat = [1.0] * 8
    # Without a switch: K 3 stops the run of skips at step 4.
    assert skipped(MagCacheState(settings(1.0, 3, 0.0), 8, flat)) == [1, 2, 3, 5, 6]
    # Switch at 3: step 3 is the low-noise expert's first step (computed), then a new run of skips.
    assert skipped(MagCacheState(settings(1.0, 3, 0.0), 8, flat, expert_switch_step=3)) == [1, 2, 4, 5, 6]


def test_expert_retention_per_stretch_and_first_expert_off():
    flat = [1.0] * 10
    # rho .4: 2 of the first 5 steps, 2 of the last 5 steps are computed.
    state = MagCacheState(settings(100.0, 100, 0.4), 10, flat, expert_switch_step=5)
    assert skipped(state) == [2, 3, 4, 7, 8]
    state = MagCacheState(settings(100.0, 100, 0.4), 10, flat, expert_switch_step=5, cache_first_expert=False)
    assert skipped(state) == [7, 8]


def test_jump_across_the_switch_computes():
    state = MagCacheState(settings(100.0, 100, 0.0), 10, [1.0] * 10, expert_switch_step=5)
    assert [state.decide(step) for step in (0, 1, 2)] == [False, True, True]
    assert state.decide(7) is False


def test_published_A14B_curve_splits_at_the_hand_over():
    calibration = default_calibration("wan2.2_t2v_A14B")
    assert calibration.expert_switch_step == 26 and calibration.ratios[52] == 0.65523
    high = expert_part(calibration, "high_noise")
    low = expert_part(calibration, "low_noise")
    assert high.ratios == calibration.ratios[:52] and high.calibrated_steps == 26
    assert low.ratios == (1.0, 1.0) + calibration.ratios[54:] and low.calibrated_steps == 14
    # At the calibrated length the run's ratios are the pair means, the hand-over replaced by 1.0.
    run = ratios_for_run(calibration, 40)
    pairs = [math.sqrt(calibration.ratios[2 * s] * calibration.ratios[2 * s + 1]) for s in range(40)]
    assert run[26] == 1.0
    assert run[:26] == pytest.approx(pairs[:26], abs=0, rel=1e-15)
    assert run[27:] == pytest.approx(pairs[27:], abs=0, rel=1e-15)


def test_published_A14B_run_never_skips_at_the_switch():
    calibration = default_calibration("wan2.2_t2v_A14B")
    wide_open = settings(100.0, 100, 0.4)
    state = MagCacheState.for_run(wide_open, 40, calibration)
    # Retention: floor(.4·26) = 10 high-noise steps, floor(.4·14) = 5 low-noise steps; last computed.
    assert skipped(state) == list(range(10, 26)) + list(range(31, 39))


def test_i2v_A14B_never_skips_the_high_noise_expert():
    calibration = default_calibration("wan2.2_i2v_A14B")
    assert calibration.expert_switch_step == 15 and calibration.cache_first_expert is False
    state = MagCacheState.for_run(settings(100.0, 100, 0.1), 40, calibration)
    # floor(.1·25) = 2 low-noise steps retained after the switch at 15.
    assert skipped(state) == list(range(17, 39))
    assert expert_part(calibration, "high_noise").threshold == 0.0
    assert expert_part(calibration, "low_noise").threshold == calibration.threshold


def test_switch_step_scales_with_the_run_length():
    assert scaled_switch_step(26, 40, 40) == 26
    assert scaled_switch_step(26, 40, 20) == 13
    assert scaled_switch_step(15, 40, 20) == 8  # 7.5 rounds to even
    assert scaled_switch_step(15, 40, 30) == 11  # 11.25
    run = ratios_for_run(default_calibration("wan2.2_t2v_A14B"), 20, expert_switch_step=12)
    assert len(run) == 20 and run[12] == 1.0


def test_separate_expert_curves_join_at_the_switch():
    high = [1.0, 0.5, 0.75, 1.25, 0.5]  # 5 calibrated steps, resampled onto 3: pairs multiply
    low = [1.0, 2.0]
    joined = expert_run_ratios(high, low, 5, 3)
    assert joined == pytest.approx([1.0, 0.375, 0.625, 1.0, 2.0], rel=1e-12)
    assert expert_run_ratios(high, low, 2, 0) == [1.0, 2.0]
    assert expert_run_ratios(high, [1.0], 1, 1) == [1.0]
    with pytest.raises(MusubiError, match="past the run"):
        expert_run_ratios(high, low, 4, 5)
    # The low-noise curve's first value lands on the switch step, which is computed whatever it is.
    for at_switch in (1.0, 1e-3):
        state = MagCacheState(settings(0.5, 100, 0.0), 6, [1.0, 1.0, 1.0, at_switch, 1.0, 1.0], expert_switch_step=3)
        assert skipped(state) == [1, 2, 4]


def test_for_run_takes_the_real_switch_step():
    calibration = default_calibration("wan2.2_t2v_A14B")
    state = MagCacheState.for_run(settings(100.0, 100, 0.4), 20, calibration, expert_switch_step=12)
    # floor(.4·12) = 4 high-noise and floor(.4·8) = 3 low-noise steps retained; 19 is last.
    assert skipped(state) == list(range(4, 12)) + list(range(15, 19))


def test_expert_part_of_a_single_network_is_refused():
    with pytest.raises(MusubiError, match="two-expert"):
        default_calibration("flux", expert="low_noise")


# ---------------------------------------------------------------------------------------------
# Per-step ratios and resampling
# ---------------------------------------------------------------------------------------------


def test_interleaved_pairs_merge_into_their_geometric_mean():
    calibration = default_calibration("wan2.1_t2v_1.3B")
    merged = per_step_ratios(calibration)
    assert len(merged) == 50
    assert merged[0] == 1.0
    assert merged[1] == pytest.approx(math.sqrt(1.0124 * 1.02213), rel=1e-15)
    assert merged[49] == pytest.approx(math.sqrt(0.81838 * 0.81939), rel=1e-15)
    assert per_step_ratios(calibration, "cond")[1] == 1.0124
    assert per_step_ratios(calibration, "uncond")[1] == 1.02213
    assert per_step_ratios(default_calibration("flux")) == list(default_calibration("flux").ratios)


def test_resampling_to_the_same_length_is_the_identity():
    values = list(default_calibration("hunyuan_video").ratios)
    assert resample_ratios(values, 50) == values
    assert resample_ratios(values, 50, "nearest") == values


@pytest.mark.parametrize("n", [2, 5, 20, 25, 37, 49, 51, 100, 200])
def test_resampling_keeps_the_product_over_the_run(n):
    values = list(default_calibration("hunyuan_video").ratios)
    resampled = resample_ratios(values, n)
    assert len(resampled) == n and resampled[0] == values[0]
    assert math.prod(resampled[1:]) == pytest.approx(math.prod(values[1:]), rel=1e-12)


def test_halving_the_steps_multiplies_pairs_of_ratios():
    values = [1.0] + [1.0 + 0.01 * ((7 * i) % 5) - 0.02 for i in range(1, 49)]  # 49 values, 48 gaps
    resampled = resample_ratios(values, 25)
    for j in range(1, 25):
        assert resampled[j] == pytest.approx(values[2 * j - 1] * values[2 * j], rel=1e-12)


def test_doubling_the_steps_takes_square_roots():
    values = [1.0, 1.21, 0.81, 1.44, 0.64]  # 4 gaps -> 8 gaps
    resampled = resample_ratios(values, 9)
    expected = [1.0, 1.1, 1.1, 0.9, 0.9, 1.2, 1.2, 0.8, 0.8]
    assert resampled == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n", [7, 13, 25, 40, 77])
def test_resampling_keeps_a_monotone_curve_monotone(n):
    values = [1.0] + [1.3 - 0.012 * i for i in range(1, 50)]  # strictly decreasing after the pad
    resampled = resample_ratios(values, n)[1:]
    assert all(a >= b - 1e-15 for a, b in zip(resampled, resampled[1:]))
    assert resampled[0] > resampled[-1]


def test_fewer_steps_than_calibrated_skip_less_eagerly_than_nearest():
    # A coarse step spans several calibrated steps, so its drift is larger than one fine ratio.
    values = list(default_calibration("hunyuan_video").ratios)
    log = resample_ratios(values, 25)
    nearest = resample_ratios(values, 25, "nearest")
    assert sum(abs(math.log(r)) for r in log) > 1.5 * sum(abs(math.log(r)) for r in nearest)


def test_resampling_errors_name_the_problem():
    with pytest.raises(MusubiError, match="method"):
        resample_ratios([1.0, 1.0], 3, "cubic")
    with pytest.raises(MusubiError, match="number of sampling steps"):
        resample_ratios([1.0, 1.0], 0)
    with pytest.raises(MusubiError, match="value 2"):
        resample_ratios([1.0, -1.0], 3)


# ---------------------------------------------------------------------------------------------
# Shipped calibrations and family mapping
# ---------------------------------------------------------------------------------------------


def test_every_shipped_calibration_is_consistent():
    keys = list_default_models()
    assert len(keys) >= 20
    for key in keys:
        calibration = default_calibration(key)
        per_call = 2 if calibration.layout == "interleaved" else 1
        assert calibration.layout in ("per_step", "interleaved"), key
        assert len(calibration.ratios) == per_call * calibration.calibrated_steps, key
        assert calibration.ratios[:per_call] == (1.0,) * per_call, key
        assert all(0.5 < value < 1.7 for value in calibration.ratios), key
        assert calibration.source, key
        assert len(per_step_ratios(calibration)) == calibration.calibrated_steps, key
        calibration.recommended_settings().validate()
        state = MagCacheState.for_run(calibration.recommended_settings(), 30, calibration)
        assert len(state.ratios) == 30, key


def test_musubi_framepack_default_is_hunyuan_video_544p():
    assert default_calibration("framepack_musubi_default").ratios == default_calibration("hunyuan_video_544p").ratios
    assert default_calibration("framepack_musubi_default").ratios != default_calibration("framepack").ratios


def test_recommended_settings_of_some_entries():
    wan = default_calibration("wan2.1_t2v_1.3B").recommended_settings()
    assert (wan.threshold, wan.K, wan.retention_ratio) == (0.12, 4, 0.2)
    framepack = default_calibration("framepack").recommended_settings()
    assert (framepack.threshold, framepack.K, framepack.max_step_deviation) == (0.1, 3, 0.06)


@pytest.mark.parametrize("architecture,variant,num_steps,key", [
    ("wan", "t2v_1.3B", None, "wan2.1_t2v_1.3B"),
    ("wan", "t2v_14B", None, "wan2.1_t2v_14B"),
    ("wan", "i2v_480p", None, "wan2.1_i2v_480p_14B"),
    ("wan", "I2V_720P", None, "wan2.1_i2v_720p_14B"),
    ("wan", "ti2v_5B", None, "wan2.2_ti2v_5B"),
    ("wan", "t2v_A14B", 40, "wan2.2_t2v_A14B"),
    ("wan", "i2v_A14B", None, "wan2.2_i2v_A14B"),
    ("hunyuan_video", None, None, "hunyuan_video"),
    ("flux", None, 20, "flux"),
    ("flux_kontext", None, 20, "flux_kontext"),
    ("flux_kontext", None, 28, "flux_kontext_diffusers_28steps"),
    ("flux_kontext", None, 30, "flux_kontext"),
    ("qwen_image", None, 50, "qwen_image_diffusers_50steps"),
    ("qwen_image", None, None, "qwen_image"),
    ("framepack", None, 25, "framepack"),
    ("framepack", "musubi", None, "framepack_musubi_default"),
    ("framepack_f1", None, None, "framepack_f1"),
])
def test_family_mapping(architecture, variant, num_steps, key):
    assert default_key_for(architecture, variant, num_steps) == key


def test_family_mapping_errors_list_the_choices():
    with pytest.raises(MusubiError, match="needs a variant.*t2v_1.3B"):
        default_key_for("wan")
    with pytest.raises(MusubiError, match="no variant 'huge'"):
        default_key_for("flux", "huge")
    with pytest.raises(MusubiError, match="architecture 'sd15'"):
        default_key_for("sd15")
    with pytest.raises(MusubiError, match="unknown"):
        default_calibration("nope")


def test_flux_never_skips_calibrated_step_11():
    calibration = default_calibration("flux")
    wide_open = settings(100.0, 100, calibration.retention_ratio)
    # rho .1 of 28: steps 0, 1 retained; step 11 forced; 27 last.
    assert skipped(MagCacheState.for_run(wide_open, 28, calibration)) == [s for s in range(2, 27) if s != 11]
    # At 55 steps calibrated step 11 sits at run step 11·54/27 = 22.
    assert 22 not in skipped(MagCacheState.for_run(wide_open, 55, calibration))


def test_pasted_ratios_override_the_calibration():
    pasted = settings(0.5, 6, 0.25, ratios="1.0, 1.0, 0.75, 1.0, 1.0, 1.25, 1.0, 1.0")
    state = MagCacheState.for_run(pasted, 8, default_calibration("flux"))
    assert skipped(state) == [2, 3, 5, 6]


# ---------------------------------------------------------------------------------------------
# Settings and parsing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,option", [
    ({"threshold": -0.1}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"K": 2.5}, "K"),
    ({"K": -1}, "K"),
    ({"retention_ratio": 1.0}, "retention_ratio"),
    ({"retention_ratio": -0.1}, "retention_ratio"),
    ({"max_step_deviation": -1.0}, "max_step_deviation"),
])
def test_settings_errors_name_the_option(kwargs, option):
    with pytest.raises(MusubiError, match=option):
        MagCacheSettings(**kwargs).validate()


def test_settings_ratios_are_checked_at_construction():
    with pytest.raises(MusubiError, match="value 2"):
        MagCacheSettings(ratios=[1.0, 0.0])
    assert MagCacheSettings(ratios=[1, 0.5]).ratios == (1.0, 0.5)


def test_parse_ratio_string_accepts_the_usual_separators():
    assert parse_ratio_string("1.00000,0.99817,0.99764") == [1.0, 0.99817, 0.99764]
    assert parse_ratio_string(" 1.0 0.5\n0.25,\n") == [1.0, 0.5, 0.25]
    assert parse_ratio_string("[1.0, 1.5]") == [1.0, 1.5]


@pytest.mark.parametrize("text,pattern", [
    ("1.0, abc, 0.9", "value 2 'abc' is not a number"),
    ("1.0,-0.5", "value 2 '-0.5' must be a positive"),
    ("1.0 nan", "value 2 'nan'"),
    ("1.0 0", "value 2 '0'"),
    ("  ", "no numbers"),
])
def test_parse_ratio_string_names_the_bad_token(text, pattern):
    with pytest.raises(MusubiError, match=pattern):
        parse_ratio_string(text)


# ---------------------------------------------------------------------------------------------
# Calibration recorder
# ---------------------------------------------------------------------------------------------


def test_scaled_residuals_give_the_scale_ratios():
    base = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    scales = [2.0, 1.5, 1.2, 1.2, 0.6]
    recorder = CalibrationRecorder()
    for scale in scales:
        recorder.record(scale * base)
    expected = [1.0] + [round(scales[t] / scales[t - 1], 5) for t in range(1, 5)]
    assert recorder.ratios() == expected
    assert recorder.norm_stds() == [0.0] * 4
    assert recorder.cos_distances() == [0.0] * 4
    assert recorder.as_paste_string() == "1.00000,0.75000,0.80000,1.00000,0.50000"


def test_per_token_statistics_against_plain_loops():
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(3, 5, generator=generator)
    second = torch.randn(3, 5, generator=generator)
    recorder = CalibrationRecorder()
    recorder.record(first)
    recorder.record(second)
    ratios, cosines = [], []
    for token in range(3):
        a, b = second[token].tolist(), first[token].tolist()
        norm_a = math.sqrt(sum(x * x for x in a))
        norm_b = math.sqrt(sum(x * x for x in b))
        ratios.append(norm_a / norm_b)
        cosines.append(sum(x * y for x, y in zip(a, b)) / (norm_a * norm_b))
    mean = sum(ratios) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in ratios) / 2)
    cos_dis = sum(1 - c for c in cosines) / 3
    assert recorder.statistics() == [
        {"step": 1, "norm_ratio": round(mean, 5), "norm_std": round(std, 5), "cos_dis": round(cos_dis, 5)}
    ]


def test_orthogonal_residuals_have_cosine_distance_one():
    recorder = CalibrationRecorder()
    recorder.record(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    recorder.record(torch.tensor([[0.0, 3.0], [4.0, 0.0]]))
    assert recorder.ratios() == [1.0, 2.5]  # mean of 3/1 and 4/2
    assert recorder.cos_distances() == [1.0]


def test_zero_tokens_are_left_out_of_the_ratio():
    recorder = CalibrationRecorder()
    recorder.record(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    recorder.record(torch.tensor([[0.0, 3.0], [5.0, 0.0]]))
    assert recorder.ratios() == [1.0, 3.0]
    recorder.reset()
    recorder.record(torch.zeros(2, 2))
    recorder.record(torch.ones(2, 2))
    with pytest.raises(MusubiError, match="zero everywhere"):
        recorder.ratios()


def test_unbatched_branches_pool_like_one_batched_call():
    generator = torch.Generator().manual_seed(2)
    steps = [torch.randn(2, 6, 4, generator=generator) for _ in range(3)]
    batched, split = CalibrationRecorder(), CalibrationRecorder()
    for index, residual in enumerate(steps):
        batched.record(residual)
        split.record(residual[0], step_index=index)
        split.record(residual[1], step_index=index)
    assert split.ratios() == batched.ratios()
    assert split.norm_stds() == batched.norm_stds()
    assert split.cos_distances() == batched.cos_distances()
    assert split.steps_recorded == 3


def test_low_precision_residuals_are_measured_in_float32():
    base = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    recorder = CalibrationRecorder()
    recorder.record(base.to(torch.bfloat16))
    recorder.record((base * 1.01).to(torch.bfloat16))
    assert abs(recorder.ratios()[1] - 1.01) < 2e-3


def test_recorder_errors_and_new_runs():
    recorder = CalibrationRecorder()
    recorder.record(torch.ones(2, 4), step_index=0)
    with pytest.raises(MusubiError, match="every step must be computed"):
        recorder.record(torch.ones(2, 4), step_index=2)
    recorder.record(torch.ones(2, 4), step_index=1)
    with pytest.raises(MusubiError, match="start a new recorder"):
        recorder.record(torch.ones(3, 4), step_index=2)
    recorder.record(torch.ones(2, 4), step_index=2)  # a refused residual leaves no trace
    assert recorder.ratios() == [1.0, 1.0, 1.0]
    recorder.record(2 * torch.ones(2, 4), step_index=0)  # back to 0: a new recording
    assert recorder.ratios() == [1.0]
    with pytest.raises(MusubiError, match="NaN"):
        recorder.record(torch.full((2, 4), float("nan")), step_index=1)


def test_json_round_trip(tmp_path):
    recorder = CalibrationRecorder()
    for scale in (1.0, 0.9, 0.81):
        recorder.record(scale * torch.ones(4, 3))
    path = tmp_path / "my_wan.json"
    recorder.save_json(str(path), "wan", steps=3, sampler="euler", scheduler="simple", extra={"cfg": 5.0})
    data = json.loads(path.read_text())
    assert data["ratios"] == [1.0, 0.9, 0.9] and data["steps"] == 3 and data["extra"] == {"cfg": 5.0}
    assert data["norm_std"] == [0.0, 0.0, 0.0] and data["cos_dis"] == [0.0, 0.0, 0.0]
    calibration = load_calibration_json(str(path))
    assert calibration.ratios == (1.0, 0.9, 0.9)
    assert calibration.calibrated_steps == 3 and calibration.layout == "per_step"
    assert calibration.architecture == "wan" and calibration.key == "my_wan"
    assert [p.name for p in tmp_path.iterdir()] == ["my_wan.json"]  # no temporary left behind


def test_saving_an_unfinished_run_is_refused():
    recorder = CalibrationRecorder()
    recorder.record(torch.ones(2, 2))
    recorder.record(torch.ones(2, 2))
    with pytest.raises(MusubiError, match="2 steps were recorded but the run has 30"):
        recorder.to_json("wan", steps=30)


def _write(tmp_path, payload) -> str:
    path = tmp_path / "calibration.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


GOOD = {"format": "musubi-magcache-calibration", "version": 1, "architecture": "wan", "steps": 2,
        "layout": "per_step", "ratios": [1.0, 0.9]}


@pytest.mark.parametrize("change,pattern", [
    ("{not json", "not valid JSON"),
    ({"format": "other"}, "not a MagCache calibration"),
    ({"version": 9}, "version 9"),
    ({"steps": 3}, "\"steps\" is 3"),
    ({"ratios": [1.0, -0.9]}, "value 2"),
    ({"ratios": "1.0,0.9"}, "must be a list"),
    ({"cos_dis": [0.0]}, "\"cos_dis\" must be a list of 2"),
    ({"architecture": ""}, "architecture"),
    ({"K": 1.5}, "K"),
])
def test_malformed_calibration_files_are_explained(tmp_path, change, pattern):
    payload = change if isinstance(change, str) else {**GOOD, **change}
    with pytest.raises(MusubiError, match=pattern):
        load_calibration_json(_write(tmp_path, payload))


def test_missing_calibration_file(tmp_path):
    with pytest.raises(MusubiError, match="not found"):
        load_calibration_json(str(tmp_path / "absent.json"))


# ---------------------------------------------------------------------------------------------
# Steps from sigmas, and which ratios a run uses
# ---------------------------------------------------------------------------------------------


def test_an_evaluation_belongs_to_the_step_its_sigma_opens_or_lies_in():
    schedule = [1.0, 0.5, 0.2, 0.0]
    assert [step_for_sigma(sigma, schedule) for sigma in (1.0, 0.7, 0.5, 0.3, 0.2, 0.0)] == [0, 0, 1, 1, 2, 2]
    assert step_for_sigma(0.5 * (1 + 1e-5), schedule) == 1  # within the tolerance of a schedule level
    assert is_descending(schedule) and not is_descending([1.0, 0.5, 0.6, 0.0])


WAN_T2V = ModelFacts("wan", "WAN21", {"model_type": "t2v", "dim": 128, "in_dim": 16})
CHOICE = dict(saved_folder="models/magcache", calibrate_with="Calibrate MagCache")


def test_auto_reads_the_published_calibration_off_plain_model_facts():
    assert auto_calibration_key(WAN_T2V, calibrate_with="x") == "wan2.1_t2v_1.3B"
    assert auto_calibration_key(ModelFacts("wan", "WAN22", wan_ti2v=True), has_denoise_mask=True,
                                calibrate_with="x") == "wan2.2_ti2v_5B_i2v"
    assert auto_calibration_key(ModelFacts("hunyuan_video", "HunyuanVideo", hunyuan_video_t2v=True),
                                latent_shape=(1, 16, 1, 68, 120), calibrate_with="x") == "hunyuan_video_544p"
    assert auto_calibration_key(ModelFacts("flux", "Flux"), has_reference_latents=True, calibrate_with="x") == "flux_kontext"
    with pytest.raises(MusubiError, match=r"\(HunyuanVideoI2V\)\. Calibrate it with 'Calibrate MagCache'"):
        auto_calibration_key(ModelFacts("hunyuan_video", "HunyuanVideoI2V"), calibrate_with="Calibrate MagCache")


def test_options_are_checked_before_any_run():
    pasted = choose_ratios(WAN_T2V, 0.24, 0.2, 6, "auto", "auto", "1, 0.9, 0.8", saved_path=None, **CHOICE)
    label, state = pasted.state_for_run(WAN_T2V, RunFacts(num_steps=3, sigmas=(1.0, 0.5, 0.2, 0.0), sigma_max=1.0))
    assert label == "pasted ratios (3 values)" and state.ratios == [1.0, 0.9, 0.8]
    with pytest.raises(MusubiError, match="measured on a hunyuan_video model but this model is wan"):
        choose_ratios(WAN_T2V, 0.24, 0.2, 6, "hunyuan_video", "auto", "", saved_path=None, **CHOICE)
    with pytest.raises(MusubiError, match=r"nor a file in models/magcache; run 'Calibrate MagCache'"):
        choose_ratios(WAN_T2V, 0.24, 0.2, 6, "mine.json", "auto", "", saved_path=None, **CHOICE)
    with pytest.raises(MusubiError, match="pasted_ratios replaces the calibration"):
        choose_ratios(WAN_T2V, 0.24, 0.2, 6, "auto", "high_noise", "1, 0.9", saved_path=None, **CHOICE)


def test_auto_expert_follows_where_the_run_starts_and_ends():
    a14b = default_calibration("wan2.2_t2v_A14B")
    assert run_expert(a14b, "auto", (1.0, 0.6, 0.4), 1.0) == "high_noise"
    assert run_expert(a14b, "auto", (0.4, 0.2, 0.0), 1.0) == "low_noise"
    assert run_expert(a14b, "auto", (1.0, 0.5, 0.0), 1.0) is None
    assert run_expert(a14b, "none", (1.0, 0.6, 0.4), 1.0) is None
    with pytest.raises(MusubiError, match="cannot tell which Wan 2.2 A14B expert"):
        run_expert(a14b, "auto", (0.8, 0.4), 1.0)

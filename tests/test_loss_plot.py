import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from musubi.errors import MusubiError
from musubi.training.loss_plot import average_window, moving_average, render_candidate_losses, render_loss_curve

DARK = np.array([0x1F, 0x4E, 0x96])  # the colour of the main curve
LIGHT = np.array([0x9B, 0xB7, 0xDC])  # the colour of the raw losses under a moving average


def pixels_of(image: np.ndarray, colour: np.ndarray, tolerance: int = 12) -> np.ndarray:
    """(row, column) of every pixel within ``tolerance`` of ``colour`` on each channel."""
    close = np.all(np.abs(image.astype(int) - colour) <= tolerance, axis=-1)
    return np.argwhere(close)


def test_moving_average_is_the_trailing_mean_of_what_exists_so_far():
    values = [4.0, 2.0, 6.0, 0.0, 8.0]
    expected = [4.0, 3.0, 4.0, 8 / 3, 14 / 3]  # window 3: (4), (4+2)/2, (4+2+6)/3, (2+6+0)/3, (6+0+8)/3
    assert moving_average(values, 3) == pytest.approx(expected)
    assert moving_average(values, 1) == pytest.approx(values)
    assert moving_average(values, 100) == pytest.approx([4.0, 3.0, 4.0, 3.0, 4.0])


def test_moving_average_skips_non_finite_losses():
    averaged = moving_average([1.0, math.nan, 3.0, math.inf, 5.0], 2)
    assert averaged[0] == pytest.approx(1.0)
    assert averaged[1] == pytest.approx(1.0)  # only the 1.0 is in the window
    assert averaged[2] == pytest.approx(3.0)
    assert averaged[3] == pytest.approx(3.0)
    assert averaged[4] == pytest.approx(5.0)
    assert np.isnan(moving_average([math.nan, math.nan], 2)).all()
    assert moving_average([], 5).shape == (0,)
    with pytest.raises(MusubiError, match="window"):
        moving_average([1.0], 0)


def test_average_window_is_a_tenth_of_the_run_between_1_and_100():
    assert [average_window(n) for n in (0, 1, 19, 20, 250, 1000, 5000)] == [1, 1, 1, 2, 25, 100, 100]


@pytest.mark.parametrize("width, height", [(768, 384), (333, 217), (64, 64)])
def test_picture_has_exactly_the_asked_size(width, height):
    image = render_loss_curve([0.5, 0.4, 0.45], width, height, "run")
    assert image.shape == (height, width, 3)
    assert image.dtype == np.uint8


def test_a_falling_loss_is_drawn_from_top_left_to_bottom_right():
    falling = render_loss_curve([1.0, 0.0], 600, 300, "")
    rising = render_loss_curve([0.0, 1.0], 600, 300, "")
    for image, left_is_higher in ((falling, True), (rising, False)):
        curve = pixels_of(image, DARK)
        assert len(curve) > 100, "the curve is missing"
        columns = curve[:, 1]
        left = curve[columns < np.quantile(columns, 0.2), 0].mean()
        right = curve[columns > np.quantile(columns, 0.8), 0].mean()
        assert (left < right) == left_is_higher  # rows grow downwards


def test_a_single_step_is_drawn_instead_of_dividing_by_zero():
    image = render_loss_curve([0.25], 400, 200, "one step")
    assert image.shape == (200, 400, 3)
    assert len(pixels_of(image, DARK)) > 5  # the point's marker


def test_long_runs_show_the_losses_under_their_moving_average():
    rng = np.random.default_rng(0)
    losses = 0.3 + 0.2 * np.exp(-np.arange(300) / 60) + 0.05 * rng.random(300)
    image = render_loss_curve(losses.tolist(), 600, 300, "long", first_step=1001)
    assert len(pixels_of(image, LIGHT)) > 200
    assert len(pixels_of(image, DARK)) > 200


def test_empty_and_non_finite_runs_still_give_a_picture():
    for losses in ([], [math.nan], [0.5, math.inf, 0.4]):
        image = render_loss_curve(losses, 300, 150, "odd")
        assert image.shape == (150, 300, 3)
        assert (image < 200).any()  # text or lines, not a blank sheet


def test_too_small_a_picture_is_refused_with_its_size():
    with pytest.raises(MusubiError, match="32x200"):
        render_loss_curve([1.0], 32, 200, "")


def test_validation_losses_are_drawn_in_green_and_candidates_ring_the_pick():
    green = (0x2C, 0xA0, 0x2C)
    plain = render_loss_curve([1.0, 0.8, 0.6, 0.5], 600, 300, "")
    with_validation = render_loss_curve([1.0, 0.8, 0.6, 0.5], 600, 300, "", validation=([0, 2, 4], [0.9, 0.7, 0.55]))
    assert len(pixels_of(plain, green)) == 0
    assert len(pixels_of(with_validation, green)) > 50
    picture = render_candidate_losses([0.05, 0.1, 0.2], [0.5, 0.4, 0.45], best=1, parameter="sigma_rel")
    assert picture.shape == (320, 640, 3)
    assert len(pixels_of(picture, (0xD6, 0x27, 0x28))) > 20  # the ring around the chosen candidate

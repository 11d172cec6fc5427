"""The soak's p99 drift statistic: a trend over the run moves it, one slow window does not."""

from tools.chaos.soak import third_medians


def test_one_spike_in_the_last_third_is_not_drift():
    flat = [5.0] * 18
    flat[-1] = 28.0  # one window with a slow event in it, as the soak saw after a swap
    first, last = third_medians(flat, 6)
    assert first == last == 5.0


def test_a_rising_series_is_drift():
    rising = [5.0 + k for k in range(18)]
    first, last = third_medians(rising, 6)
    assert first == 7.5 and last == 19.5


def test_windows_without_answers_are_left_out():
    assert third_medians([None, 4.0, 6.0, None, 8.0, None], 2) == (4.0, 8.0)
    assert third_medians([None, None], 1) == (None, None)

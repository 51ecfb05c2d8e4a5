"""One byte formatter for every screen: the same artifact reads the same in the Library, a card, the CLI and a
status line."""
import pytest

from ragdemo.units import fmt_bytes, fmt_duration, fmt_s


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (None, "0 B"), (999, "999 B"), (999.6, "1.00 kB"), (1000, "1.00 kB"), (1234, "1.23 kB"),
    (9996, "10.0 kB"), (24_800, "24.8 kB"), (99_950, "100 kB"), (248_140, "248 kB"), (999_500, "1.00 MB"),
    (1_329_560, "1.33 MB"), (1_577_700, "1.58 MB"), (77_616_216, "77.6 MB"), (2.5e9, "2.50 GB"),
    (5e16, "50000 TB"),
])
def test_three_significant_figures_in_decimal_units(n, text):
    assert fmt_bytes(n) == text


def test_parts_read_as_their_total_would():
    """BTR's codes and decoder, as the Library shows them, against the 'prepared' line that sums them."""
    codes, decoder = 248_140, 1_329_560
    assert (fmt_bytes(codes), fmt_bytes(decoder), fmt_bytes(codes + decoder)) == ("248 kB", "1.33 MB", "1.58 MB")


def test_times_read_as_measured_and_estimates_as_estimates():
    assert [fmt_s(s) for s in (0.0084, 0.15, 2.554)] == ["8 ms", "150 ms", "2.55 s"]
    assert [fmt_duration(s) for s in (0.2, 32.76, 270, 598, 3571)] == ["200 ms", "33 s", "4.5 min", "10 min", "1.0 h"]

import pytest

from gpumagic.units import format_bytes, format_size_torch, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5GiB", 3 * 2**29),
        ("800MB", 800_000_000),
        ("24MiB", 24 * 2**20),
        ("800.5MiB", 839385088),
        ("2 GB", 2_000_000_000),
        ("1024", 1024),
        ("512 bytes", 512),
        ("1e3kB", 1_000_000),
        (4096, 4096),
    ],
)
def test_parse_size_accepts_iec_si_and_plain_bytes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "-1GB", "1 parsec", "0", 0, -5, True, 1.5])
def test_parse_size_rejects_bad_values_naming_them(bad):
    with pytest.raises(ValueError, match=r"budget must be") as e:
        parse_size(bad, name="budget")
    if isinstance(bad, str) and bad:
        assert repr(bad) in str(e.value)


def test_format_bytes_uses_iec_units_with_two_decimals():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**30 // 2) == "1.50 GiB"
    assert format_bytes(-2**20) == "-1.00 MiB"
    assert format_bytes(2**20, signed=True) == "+1.00 MiB"
    assert format_bytes(None) == "unknown"


def test_format_size_torch_matches_pytorch_allocator_wording():
    assert format_size_torch(1024) == "1024 bytes"
    assert format_size_torch(1025) == "1.00 KiB"
    assert format_size_torch(20 * 2**20) == "20.00 MiB"
    assert format_size_torch(2**30 + 1) == "1.00 GiB"

"""benchmarks/machine.py names AMD's Zen generation from /proc/cpuinfo's family and model, as AMD publishes
them (e.g. EPYC Rome 23/49, Milan 25/1, Genoa 25/17, Turin 26/2)."""
import pytest

from benchmarks.machine import amd_zen


@pytest.mark.parametrize("vendor, family, model, zen", [
    ("AuthenticAMD", "23", "1", "Zen / Zen+"),   # Naples
    ("AuthenticAMD", "23", "49", "Zen 2"),       # Rome
    ("AuthenticAMD", "25", "1", "Zen 3"),        # Milan
    ("AuthenticAMD", "25", "17", "Zen 4"),       # Genoa
    ("AuthenticAMD", "25", "160", "Zen 4"),      # Bergamo / Siena
    ("AuthenticAMD", "26", "2", "Zen 5"),        # Turin
    ("AuthenticAMD", "25", "144", None),         # a model number outside the published ranges
    ("GenuineIntel", "6", "143", None),          # Sapphire Rapids
    ("AuthenticAMD", None, None, None),          # no /proc/cpuinfo
])
def test_zen_generation_from_family_and_model(vendor, family, model, zen):
  assert amd_zen(vendor, family, model) == zen

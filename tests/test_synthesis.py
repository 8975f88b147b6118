"""Synthesis pieces on hand-built inputs: requests, spans, denoising, resumable progress files."""
import json

import numpy as np
import pytest

from msp_jax import requested, synthesis
from msp_jax.data.example import Example
from msp_jax.data.spans import label_found_values

SEEDS = [
    Example("m/0", "music", "Queen played Bohemian Rhapsody live", {"entities": ("band", "song")},
            ("Queen", "Bohemian Rhapsody"), (("band", "Queen"), ("song", "Bohemian Rhapsody"))),
    Example("m/1", "music", "Adele won a Grammy", {"entities": ("award", "musicalartist")},
            ("Adele", "Grammy"), (("musicalartist", "Adele"), ("award", "Grammy"))),
    Example("m/2", "music", "Queen won a Grammy", {"entities": ("award", "band")},
            ("Queen", "Grammy"), (("band", "Queen"), ("award", "Grammy"))),
]


def test_requests_keep_seed_sets_and_add_observed_combinations():
  requests = requested.plan_requests(SEEDS, 20, 0.5, np.random.default_rng(0))
  assert len(requests) == 60 and [r.index for r in requests] == list(range(60))
  graph = requested.cooccurrence(SEEDS)
  seen_sets = {frozenset(s.keys()) for s in SEEDS}
  new_sets = set()
  for r in requests:
    keys = frozenset(("entities", n) for n in r.attributes["entities"])
    if r.kind == "seed":
      assert keys == r.seed.keys() and r.typed_values == r.seed.typed_values
    else:  # every added attribute co-occurs with one the seed had
      assert any(k2 in graph[k1] for k1 in r.seed.keys() & keys for k2 in keys - r.seed.keys())
      if keys not in seen_sets:
        new_sets.add(keys)
    assert {t for t, _ in r.typed_values} == set(r.attributes["entities"])  # a value for every type
  assert new_sets  # e.g. {band, award, song}: never seen together in the seeds
  again = requested.plan_requests(SEEDS, 20, 0.5, np.random.default_rng(0))
  assert [r.attributes for r in again] == [r.attributes for r in requests]


def test_max_values_asks_for_at_most_that_many_values_and_only_their_types(load_task):
  seeds = list(load_task("crossner", "politics", "few_shot").splits["train"])
  rng = lambda: np.random.default_rng(3)
  plain, capped = requested.plan_requests(seeds, 2, 0.25, rng()), requested.plan_requests(seeds, 2, 0.25, rng(), 2)
  assert requested.plan_requests(seeds, 2, 0.25, rng(), 0) == plain  # 0: no cap, the same requests as before
  assert max(len(r.typed_values) for r in plain) > 2 and len(capped) == len(plain)
  seen = {tv for ex in seeds for tv in ex.typed_values}
  for r in capped:
    assert 1 <= len(r.typed_values) <= 2 or not r.seed.typed_values
    assert set(r.typed_values) <= (set(r.seed.typed_values) if r.kind == "seed" else seen)
    assert set(r.attributes["entities"]) == {t for t, _ in r.typed_values}  # no type without its value
    assert r.values == tuple(v for _, v in r.typed_values)
  assert len({r.typed_values for r in capped if r.seed is seeds[0]}) == 2  # each request its own choice
  from configs import common
  c = common.get_config()
  c.update(max_request_values=2, num_generations=2, combination_fraction=0.25, seed=3)
  planned = synthesis.make_planner(c, seeds, None, 0).plan(0, [], 0)  # what generate.py asks for
  assert max(len(r.typed_values) for r in planned) == 2
  c.max_request_values = -1
  with pytest.raises(synthesis.ConfigError, match="config.max_request_values=-1: must be >= 0"):
    synthesis.validate(c)


def test_cut_at_stop_strings():
  assert synthesis.cut(" book a room please\n4) another") == "book a room please"
  assert synthesis.cut("so... anyway") == "so"
  assert synthesis.cut("2) how can I get a refund?\n3) x") == "how can I get a refund?"


def record(request_index, text, seed=SEEDS[0], prompt="music:\n1) Freddie sang at Wembley\n2) ", typed=None):
  request = requested.Request(request_index, seed, dict(seed.attributes),
                              seed.typed_values if typed is None else typed, seed.values, "seed")
  return synthesis.candidate_record(request, text, prompt, "msp", {"do_sample": True})


def test_denoising_removes_each_kind_of_noise_and_counts_it():
  candidates = [
      record(0, ""),                                           # empty
      record(1, "Queen played Bohemian Rhapsody live"),         # copy of its seed
      record(2, "freddie sang at  wembley"),                     # copy of an exemplar in its prompt
      record(3, "Queen played Bohemian Rhapsody in Paris"),     # fine
      record(4, "queen played bohemian rhapsody in  paris"),    # duplicate of 3
      record(5, "Queen played a song"),                         # misses the song value
      record(6, "Bohemian Rhapsody by Queen was a hit"),        # fine
      record(7, "Queen and Bohemian Rhapsody xyz xyz xyz"),     # fine but far from the seed
  ]
  embeddings = {"Queen played Bohemian Rhapsody in Paris": [1.0, 0.1], "Bohemian Rhapsody by Queen was a hit": [1.0, 0.2],
                "Queen and Bohemian Rhapsody xyz xyz xyz": [0.0, 1.0], SEEDS[0].text: [1.0, 0.0]}
  embed = lambda texts: np.array([embeddings[t] for t in texts])
  kept, removed = synthesis.denoise(candidates, SEEDS, keep_fraction=0.67, embed=embed, frequency_weight=0.0)
  assert removed == {"empty": 1, "copy_of_seed": 1, "copy_of_exemplar": 1, "duplicate": 1, "missing_value": 1,
                     "noise": 1}
  assert [r["request"] for r in kept] == [3, 6]
  assert kept[0]["spans"][1] == {"type": "song", "value": "Bohemian Rhapsody", "start": 13, "end": 30}
  assert kept[0]["noise"] == pytest.approx(1 - 1 / np.sqrt(1.01))


def test_value_coverage_keeps_partial_outputs_labelled_with_what_they_contain():
  candidates = [record(0, "Queen played a song in Paris"),   # 1 of 2 values: the song is missing
                record(1, "Some band played a song"),        # 0 of 2
                record(2, "Queen played Bohemian Rhapsody in Paris")]
  embed = lambda texts: np.ones((len(texts), 2))
  strict, removed = synthesis.denoise([dict(c) for c in candidates], SEEDS, 1.0, embed)
  assert [r["request"] for r in strict] == [2] and removed == {"missing_value": 2}
  half, removed = synthesis.denoise([dict(c) for c in candidates], SEEDS, 1.0, embed, min_value_coverage=0.5)
  assert [r["request"] for r in half] == [0, 2] and removed == {"missing_value": 1}
  assert half[0]["spans"] == [{"type": "band", "value": "Queen", "start": 0, "end": 5}]
  assert half[0]["attributes"] == {"entities": ["band"]}  # the missing song is not claimed as a label
  assert half[1]["attributes"] == {"entities": ["band", "song"]} and len(half[1]["spans"]) == 2


def test_frequency_term_drops_over_represented_attributes_first():
  """The original's rebalancing, by hand. Seed counts: band 2, award 2, song 1, musicalartist 1 (top 2).
  noise = 0.5 (1 - cos) + 0.5 mean(count / top):
    A {award, band}          cos 1            -> 0.5 * 0 + 0.5 * (2/2 + 2/2) / 2 = 0.5
    B {award, musicalartist} cos 1            -> 0.5 * 0 + 0.5 * (2/2 + 1/2) / 2 = 0.375
    C {band, song}           cos 3 / sqrt(10) -> 0.5 * (1 - 3 / sqrt(10)) + 0.375 = 0.40066
  Keeping 2 of 3 drops A, whose attributes are the most frequent, though it is the closest to its seed."""
  candidates = [record(0, "Queen won another Grammy", seed=SEEDS[2]), record(1, "Adele won a Grammy again", seed=SEEDS[1]),
                record(2, "Queen played Bohemian Rhapsody twice", seed=SEEDS[0])]
  vectors = {"Queen won another Grammy": [1.0, 0.0], SEEDS[2].text: [1.0, 0.0], "Adele won a Grammy again": [0.0, 2.0],
             SEEDS[1].text: [0.0, 1.0], "Queen played Bohemian Rhapsody twice": [3.0, 1.0], SEEDS[0].text: [1.0, 0.0]}
  embed = lambda texts: np.array([vectors[t] for t in texts])
  before = synthesis.attribute_counts(candidates)
  kept, removed = synthesis.denoise(candidates, SEEDS, keep_fraction=2 / 3, embed=embed, frequency_weight=0.5)
  assert [r["request"] for r in kept] == [1, 2] and removed == {"noise": 1}
  np.testing.assert_allclose([c["noise"] for c in candidates], [0.5, 0.375, 0.5 * (1 - 3 / np.sqrt(10)) + 0.375])
  after = synthesis.attribute_counts(kept)
  assert before == {"entities": {"award": 2, "band": 2, "musicalartist": 1, "song": 1}}
  assert after == {"entities": {"award": 1, "band": 1, "musicalartist": 1, "song": 1}}
  lines = synthesis.summarise(kept, removed, 3, {"before": before, "after": after}).splitlines()
  assert lines[0] == "generated 3 candidates, kept 2; removed: noise 1"
  assert "  entities/band: 2 -> 1  Queen played Bohemian Rhapsody twice" in lines
  assert "  entities/award: 2 -> 1  Adele won a Grammy again" in lines


def test_progress_file_drops_a_torn_last_line(tmp_path):
  path = str(tmp_path / "out.jsonl.candidates")
  synthesis.append_progress(path, [{"request": 0}, {"request": 1}])
  with open(path, "a") as f:
    f.write('{"request": 2, "te')  # killed mid-write
  assert synthesis.read_progress(path) == [{"request": 0}, {"request": 1}]
  assert open(path).read() == '{"request": 0}\n{"request": 1}\n'


def test_output_records_have_the_schema():
  c = dict(record(3, "Queen played Bohemian Rhapsody in Paris"), noise=0.1)
  label_found_values(c)  # what denoising does to every kept candidate
  r = synthesis.output_record(c)
  assert set(r) == {"text", "attributes", "values", "spans", "domain", "seed_id", "kind", "method", "decoding", "noise"}
  json.dumps(r)

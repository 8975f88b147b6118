"""Which config fields each cached artifact depends on.

The grid (experiment.py) keys every result, generation and prompt run by these fields, so a changed config
never reuses old results; train.py refuses to resume a run under other training fields, so one run never
mixes two settings. A field in none of the groups below counts as a training field: an unknown field can
cost a rerun, never a stale result.
"""
from msp_jax import consistency, mixers

# The baselines' own sampling temperatures (configs/experiment.py); the MSP mixers sample at `temperature`.
OWN_TEMPERATURE = {"in_context": "in_context_temperature", "prompt_tuning": "prompt_tuning_temperature"}


# (OWN_TEMPERATURE's fields are resolved into their rows' `temperature` by method_config: they are keyed there.)
NEUTRAL_FIELDS = ("workdir", "output", "data_dir", "tasks", "methods", "num_seeds", "rescore", "log_every",
                  "checkpoint_every", "model_parallel", "coordinator_address", "num_processes", "process_id",
                  *OWN_TEMPERATURE.values())
GENERATION_FIELDS = ("method", "checkpoint", "num_generations", "combination_fraction", "keep_fraction", "frequency_weight",
                     "min_value_coverage", "max_seeds", "gen_batch_size", "do_sample", "temperature", "top_k", "top_p",
                     "repetition_penalty", "num_beams", "synthetic_per_example", "max_generation_rounds", "requests", "balance",
                     "max_request_values")
FINETUNE_FIELDS = ("finetune_params", "finetune_epochs", "finetune_lr", "finetune_batch_size", "finetune_max_new_tokens",
                   "finetune_repetition_penalty", "finetune_group_by_length", "finetune_filter", "finetune_dev_max")  # read only with downstream="finetune"
# Read only by the span tagger (CrossNER, span-labelled files): out of the intent tasks' keys.
SPAN_TAGGER_FIELDS = ("mask_synthetic_o", "tagger_steps", "tagger_l2", "tagger_batch_size", "tagger_patience")
DOWNSTREAM_FIELDS = ("synthetic_per_example", "max_seeds", "max_test", "max_dev", "downstream_hidden", "downstream_steps",
                     "downstream_l2", "downstream_eval_every", "downstream_thresholds", "quality_sample", "quality_draws",
                     *SPAN_TAGGER_FIELDS, "source_data", "source_fraction", "consistency_filter", *consistency.FIELDS,
                     "downstream", *FINETUNE_FIELDS)
INPUT_FIELDS = ("model", "dtype", "param_dtype", "dataset", "domain", "setting", "seed")  # every artifact's inputs
IN_CONTEXT_FIELDS = (*INPUT_FIELDS, "data_seed", "num_shot", "max_mixture", "buckets", "max_new_tokens", *GENERATION_FIELDS)


# Fields added after results were cached, each with the value that reproduces what was made before it
# existed: at that value a field is left out of every key, so adding an option never invalidates the
# results of a grid that does not use it (a grid runs for many hours, across invocations).
ADDED_FIELDS = {"mask_synthetic_o": False, "max_request_values": 0, "source_data": False, "consistency_filter": "none",
                "downstream": "probe", "finetune_group_by_length": False, "group_by_slots": False, "finetune_filter": "each",
                "finetune_dev_max": 0, "tagger_steps": 0, "tagger_l2": (), "tagger_batch_size": 0,
                "tagger_patience": 0}
# Fields that only an added option reads: with the option at its old value nothing uses them, so they are
# out of every key whatever their values (an old grid stays current, and changing them while the option is
# off recomputes nothing: e.g. the probe heads never read finetune_*).
INACTIVE_WITHOUT = {"consistency_filter": consistency.FIELDS, "source_data": ("source_fraction",),
                    "downstream": FINETUNE_FIELDS}


def keyed(config: dict) -> dict:
  """`config` without the added fields that are at their old behaviour's value, nor the fields they switch off."""
  inactive = {f for k, fields in INACTIVE_WITHOUT.items() if config.get(k, ADDED_FIELDS[k]) == ADDED_FIELDS[k] for f in fields}
  if not mixers.widens_prefix(config.get("mixture", "")):  # slot grouping changes only concat's batches
    inactive.add("group_by_slots")
  return {k: v for k, v in config.items() if not (k in ADDED_FIELDS and v == ADDED_FIELDS[k]) and k not in inactive}


def training_fields(config: dict) -> dict:
  """The fields trained prompts depend on, from a config dict (a method config's or a workdir's metadata)."""
  return keyed({k: v for k, v in config.items() if k not in (*NEUTRAL_FIELDS, *GENERATION_FIELDS, *DOWNSTREAM_FIELDS)})

"""Device mesh, partition rules and multi-host start-up.

One `Mesh` with two named axes: `data` (batch parallelism) and `model` (shards big backbones'
weights by heads / MLP / vocabulary). Parameters carry logical axis names (see
`msp_jax.models.layers`); `RULES` maps them onto mesh axes. A dimension that the mesh axis does
not divide (e.g. SmolLM2's 9 heads on 2 devices) stays replicated rather than failing.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

# logical axis -> mesh axis (None: replicated). Prompts and mixers carry no names: replicated.
RULES = {"vocab": MODEL, "heads": MODEL, "kv_heads": MODEL, "mlp": MODEL,
         "embed": None, "layers": None, "head_dim": None}


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1):
  """Starts multi-host JAX when configured (arguments or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID). Must run before any other JAX call. A no-op for a single process."""
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  count = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
  pid = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
  if not address or count <= 1:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # lets CPU processes talk (tests)
  jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid)
  return True


def make_mesh(model_parallel: int = 1) -> Mesh:
  """All devices as a (data, model) mesh. Built directly from devices: jax.make_mesh defaults to
  Explicit axes, which breaks with_sharding_constraint-style Auto sharding."""
  devices = np.asarray(jax.devices())
  if devices.size % model_parallel:
    raise ValueError(f"model_parallel={model_parallel} does not divide the {devices.size} devices")
  return Mesh(devices.reshape(-1, model_parallel), (DATA, MODEL))


def spec_for(axes, shape, mesh: Mesh) -> P:
  """PartitionSpec for logical `axes` of an array of `shape` on `mesh`."""
  if not axes:
    return P()
  spec = []
  for name, size in zip(axes, shape):
    mesh_axis = RULES.get(name)
    ok = mesh_axis is not None and mesh.shape[mesh_axis] > 1 and size % mesh.shape[mesh_axis] == 0
    spec.append(mesh_axis if ok else None)
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh):
  """NamedShardings for every leaf of an nnx.State, from each variable's logical axes."""
  def one(var):
    axes = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    return NamedSharding(mesh, spec_for(axes, np.shape(value), mesh))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy arrays (this process's rows) -> global jax.Arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}

"""What made a cached artifact, as a short stable key, so that changed inputs are never silently reused.

A key is a hash of the settings (and upstream keys) an artifact depends on. It is stored beside the
artifact in `<path>.key.json` with the settings themselves, so a mismatch can say which ones changed.
A stale artifact is never deleted: it is moved aside to `<path>.stale-<old key, 8 hex>`.
"""
from __future__ import annotations

import hashlib
import json
import os


def stable_key(fields: dict) -> str:
  """16 hex digits of sha256 over the fields as canonical JSON (key order and tuple/list do not matter)."""
  text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def sidecar(path: str) -> str:
  return path + ".key.json"


def read_key(path: str) -> dict | None:
  """{"key", "fields"} stored beside `path`, or None."""
  try:
    with open(sidecar(path)) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def write_key(path: str, fields: dict) -> str:
  key = stable_key(fields)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = sidecar(path) + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"key": key, "fields": fields}, f, indent=1, sort_keys=True, default=repr)
  os.replace(tmp, sidecar(path))
  return key


def set_aside(path: str, old_key: str | None) -> str:
  """Renames `path` (file or folder) to `<path>.stale-<key8>` (a free name); returns the new path."""
  base = f"{path}.stale-{(old_key or 'unkeyed')[:8]}"
  target, n = base, 1
  while os.path.exists(target):
    target, n = f"{base}.{n}", n + 1
  os.replace(path, target)
  return target


def changed_fields(old: dict | None, new: dict, prefix: str = "") -> list[str]:
  """Dotted names of the fields whose values differ (added or removed count as changed)."""
  old = json.loads(json.dumps(old or {}, default=repr))  # tuples -> lists, as stored
  new = json.loads(json.dumps(new, default=repr))
  names = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      names += changed_fields(a, b, f"{prefix}{k}.")
    elif a != b:
      names.append(prefix + k)
  return names


def describe_change(old: dict | None, new: dict) -> str:
  if old is None:
    return "it records no key (made before keys were stored, or interrupted)"
  names = changed_fields(old.get("fields"), new)
  shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
  return f"made with other settings ({shown or 'unknown'})"


def reusable(path: str, fields: dict, what: str) -> bool:
  """True when `path` exists and was made from exactly `fields`. A stale `path` (and its key) is moved
  aside with one line saying why, so the caller recomputes it; a missing one just returns False."""
  if not os.path.exists(path):
    return False
  old = read_key(path)
  if old is not None and old.get("key") == stable_key(fields):
    return True
  aside = set_aside(path, old and old.get("key"))
  if old is not None:
    os.replace(sidecar(path), sidecar(aside))
  print(f"{what}: {path} was {describe_change(old, fields)}; recomputing it (old copy: {aside})", flush=True)
  return False

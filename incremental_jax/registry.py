"""Name tables: the one helper behind every table of names a config can hold (methods, backbones, heads, data
sources, samplers, auxiliary losses, views, conv lowerings, compute dtypes, exemplar selections, learning-rate
schedules, presets).

A `Registry` is a read-only mapping {name: value}, built from a dict or filled with its `register` decorator,
as Flax's and big_vision's plain-dict registries are read; it adds what they leave to every caller: `lookup(name,
field)` raises one error type, `UnknownName`, whose one-line message names the config field, the bad value, the
valid names and the close matches (`difflib.get_close_matches`, as Python's own "did you mean" suggestions).
A leaf module next to `errors`: every floor can define or read a table.
"""
from __future__ import annotations

import difflib
from typing import Iterator, Mapping, TypeVar

from incremental_jax.errors import UnknownName

T = TypeVar('T')
_UNSET = object()


def close_matches(name, candidates) -> list[str]:
  """The (at most 3) candidates close to `name` by `difflib.get_close_matches` (ratio >= 0.6), best first."""
  return difflib.get_close_matches(str(name), [str(c) for c in candidates], n=3, cutoff=0.6)


def unknown_name_message(field: str, name, kind: str, valid, hint: str = '') -> str:
  """The one line of an unknown `name` in config field `field`: "model.backbone='resnt' is not a backbone;
  valid names: [...]. Did you mean 'resnet'?" (`kind` with its article; `hint` follows the names)."""
  close = close_matches(name, valid)
  suggestion = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ''
  return f'{field}={name!r} is not {kind}; valid names: {sorted(valid)}{hint}.{suggestion}'


class Registry(Mapping[str, T]):
  """A read-only table {name: value} of one `kind` of thing ('a backbone', 'an auxiliary loss').

  `Registry(kind, {name: value})` or `@table.register('name')`; `table[name]`, `name in table`, iteration
  (in registration order) and `len` as a dict's. `lookup(name, field)` is the checked read configs go through.
  """

  def __init__(self, kind: str, entries: Mapping[str, T] | None = None, hint: str = ''):
    self.kind, self.hint = kind, hint
    self._entries: dict[str, T] = {}
    for name, value in dict(entries or {}).items():
      self.register(name, value)

  def __getitem__(self, name: str) -> T:
    return self._entries[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f'Registry({self.kind!r}, {sorted(self._entries)})'

  def register(self, name: str, value=_UNSET, *, replace: bool = False):
    """Adds `value` as `name` and returns it; without `value`, a decorator that does so. A name already taken by
    another value raises ValueError unless `replace` (the same value again is a no-op)."""
    if value is _UNSET:
      return lambda v: self.register(name, v, replace=replace)
    if not name or not isinstance(name, str):
      raise ValueError(f'a name of {self.kind} must be a non-empty string; got {name!r}.')
    taken = self._entries.get(name, _UNSET)
    if taken is not _UNSET and taken is not value and not replace:
      raise ValueError(f'{name!r} is already registered as {self.kind} ({_describe(taken)}); pass replace=True to '
                       'replace it.')
    self._entries[name] = value
    return value

  def lookup(self, name, field: str) -> T:
    """The value of `name`, read from config field `field`; `UnknownName` (a ConfigError) naming the field,
    the value, the valid names and the close matches otherwise."""
    if isinstance(name, str) and name in self._entries:
      return self._entries[name]
    raise UnknownName(unknown_name_message(field, name, self.kind, self._entries, self.hint))

  def with_entries(self, **entries: T) -> 'Registry[T]':
    """A new registry of the same kind holding these entries over this one's (e.g. a test's stand-in source)."""
    return Registry(self.kind, {**self._entries, **entries}, self.hint)


def _describe(value) -> str:
  name = getattr(value, '__qualname__', None) or repr(value)
  module = getattr(value, '__module__', None)
  return f'{module}.{name}' if module else str(name)

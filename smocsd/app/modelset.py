"""The models a configuration stands for: each `[models.<name>]` table (or the top level
alone), and for a partitioned one (`source.partition_column`) one model per value, named
`<model.name>@<value>`.

A partition's model exists once its value is in the table or its directory is in the
store: new values are found at every check without a restart, and a value that stops
sending keeps its model (its versions, its status line, `--model` finding it).
"""

from __future__ import annotations

import logging

from ..common.config import PARTITION_SEPARATOR, Config, partition_value
from ..data.sources import Source, SourceError, open_source

log = logging.getLogger(__name__)


class NoSuchModel(LookupError):
    """`--model NAME` names no model of the configuration; the message lists those that
    exist."""


def stored_values(definition: Config) -> list[str]:
    """The partition values whose models have a directory under models/."""
    prefix = definition.model.name + PARTITION_SEPARATOR
    root = definition.state_dir / "models"
    try:
        names = [p.name for p in root.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return []
    values = []
    for name in names:
        try:
            values.append(partition_value(name[len(prefix) :]))
        except ValueError:
            continue
    return values


class ModelSet:
    """The configuration's models, found again at every `resolve()`.

    Values the partition column holds that cannot name a model are said once each; their
    rows are not modelled. A source that cannot be read leaves the models known so far
    (their stored ones included), and says why once.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._refused: set[tuple[str, str]] = set()
        self._unreadable: dict[str, str] = {}
        # One source per definition, kept: a PostgreSQL connection, and the table's checks
        # (its missing index said once), are not redone at every check.
        self._sources: dict[str, Source] = {}

    def table_values(self, definition: Config) -> list[str]:
        """The partition values in the table now (those that can name a model)."""
        name = definition.model.name
        source = self._sources.get(name) or open_source(definition.source)
        self._sources[name] = source
        try:
            raw = source.partitions()
        except SourceError as exc:
            source.close()  # the next check connects again
            if self._unreadable.get(name) != str(exc):
                log.warning("models %s@*: values not read: %s", name, exc)
            self._unreadable[name] = str(exc)
            return []
        if self._unreadable.pop(name, None) is not None:
            log.info("models %s@*: values read again", name)
        values = []
        for value in raw:
            try:
                values.append(partition_value(value))
            except ValueError as exc:
                if (name, repr(value)) not in self._refused:
                    self._refused.add((name, repr(value)))
                    log.warning(
                        "%s: %s.%s value %s: its rows are not modelled "
                        "(source.partition_column of %s)",
                        definition.source.table,
                        definition.source.table,
                        definition.source.partition_column,
                        exc,
                        name,
                    )
        return values

    def close(self) -> None:
        for source in self._sources.values():
            source.close()

    def resolve(self, *, read_table: bool = True) -> list[Config]:
        """Every model, in a stable order (definitions as configured, values sorted);
        `read_table=False` knows only the partitions in the store."""
        models: list[Config] = []
        for definition in self.cfg.definitions():
            if not definition.partitioned:
                models.append(definition)
                continue
            values = set(stored_values(definition))
            if read_table:
                values.update(self.table_values(definition))
            models += [definition.for_partition(v) for v in sorted(values, key=_value_order)]
        return models


def _value_order(value: str) -> tuple[int, int, str]:
    """Integers in numeric order before text: pump 2 before pump 10."""
    return (0, int(value), "") if value.isdigit() else (1, 0, value)


def find(cfg: Config, name: str | None, *, read_table: bool = True) -> Config:
    """The model `--model NAME` names; without NAME, the only model. NoSuchModel, naming
    those that exist, when NAME is none of them or there are several to choose from."""
    found = ModelSet(cfg)
    try:
        models = found.resolve(read_table=read_table)
    finally:
        found.close()
    if name is None and len(models) == 1:
        return models[0]
    for model in models:
        if model.model.name == name:
            return model
    names = ", ".join(m.model.name for m in models) or "none yet"
    if name is None:
        raise NoSuchModel(f"several models: name one with --model ({names})")
    raise NoSuchModel(f"no model {name!r}: the models are {names}")

"""Model instances from the row images (``to_jsonb(OLD)``, ``to_jsonb(NEW)``) that triggers send."""

from __future__ import annotations

import decimal
import functools
from typing import Any

from django.apps import apps
from django.db import models

from pgpubsub.exceptions import InvalidPayload

#: (app label, model name) -> model, as found: the app registry is looked up once per model.
_models: dict[tuple[str, str], type[models.Model]] = {}


def model_for_payload(channel_cls: Any, payload: dict[str, Any]) -> type[models.Model]:
    """The model a trigger payload speaks of, named by its ``app`` and ``model`` (every trigger
    writes both; a payload without them cannot be told apart from a forged or damaged one)."""
    app_label, model_name = payload.get("app"), payload.get("model")
    if isinstance(app_label, str) and isinstance(model_name, str):
        found = _models.get((app_label, model_name))
        if found is not None:
            return found
    missing = [key for key, value in (("app", app_label), ("model", model_name)) if not value]
    if missing or not isinstance(app_label, str) or not isinstance(model_name, str):
        named = ", ".join(repr(key) for key in missing) or "'app' and 'model' as text"
        raise InvalidPayload(
            f"{channel_cls.name()}: trigger payload lacks {named}: {payload!r:.200}"
        )
    try:
        found = _models[app_label, model_name] = apps.get_model(app_label, model_name)
        return found
    except LookupError:
        raise InvalidPayload(
            f"{channel_cls.name()}: payload names model {app_label}.{model_name}, "
            "which is not installed"
        ) from None


@functools.cache
def _column_plan(model: type[models.Model]) -> tuple[tuple[str, str, Any], ...]:
    """(column, attname, to_python) for each column of the model's own table."""
    plan = []
    for field in model._meta.local_concrete_fields:
        if field.is_relation:
            target = field.target_field
            convert = target.to_python
        elif isinstance(field, models.BinaryField):
            convert = _bytea_from_json
        elif isinstance(field, models.JSONField):
            convert = _plain_json
        else:
            convert = field.to_python
        plan.append((field.column, field.attname, convert))
    return tuple(plan)


def _plain_json(value: Any) -> Any:
    # Payloads are parsed with Decimal for exact numeric columns; JSON columns hold floats.
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, list):
        return [_plain_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain_json(item) for key, item in value.items()}
    return value


def _bytea_from_json(value: Any) -> Any:
    # to_jsonb(bytea) gives the hex form '\x0102...'.
    if isinstance(value, str) and value.startswith("\\x"):
        return bytes.fromhex(value[2:])
    return value


def instance_from_row(model: type[models.Model], row: dict[str, Any] | None) -> models.Model | None:
    """An unsaved instance of ``model`` from a row image keyed by column name.

    Columns the model no longer has are ignored; fields the row lacks keep their defaults.
    """
    if row is None:
        return None
    if not isinstance(row, dict):
        raise InvalidPayload(f"row image of {model._meta.label} is not an object: {row!r:.200}")
    kwargs = {}
    for column, attname, convert in _column_plan(model):
        if column in row:
            value = row[column]
            kwargs[attname] = None if value is None else convert(value)
    parent_link = model._meta.pk
    if isinstance(parent_link, models.OneToOneField) and parent_link.attname in kwargs:
        # Multi-table inheritance: the row is the child's; give the parent's key too.
        parent_pk = parent_link.remote_field.model._meta.pk
        kwargs.setdefault(parent_pk.attname, kwargs[parent_link.attname])
    return model(**kwargs)

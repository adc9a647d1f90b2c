"""Decorators that bind listener functions to channels (and install triggers for trigger channels)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Protocol, TypeVar

import pgtrigger
from django.db import models
from django.db.models import Q

from pgpubsub import conf
from pgpubsub.channel import (
    BaseChannel,
    Channel,
    TriggerChannel,
    _trigger_operations,
    locate_channel,
)
from pgpubsub.exceptions import InvalidChannel, ListenerSignatureError

F = TypeVar("F", bound=Callable)


class ListenerFilterProvider(Protocol):
    """What ``PGPUBSUB_LISTENER_FILTER`` names: ``get_filter()`` narrows the stored
    notifications a listener may claim (for example by ``db_version`` during a deploy)."""

    def get_filter(self) -> Q: ...


def _sent_arguments(channel_cls: type[BaseChannel]) -> set[str]:
    if issubclass(channel_cls, TriggerChannel):
        names = {"old", "new"}
        if conf.pass_context_to_listeners():
            names.add("context")
        return names
    return {field.name for field in dataclasses.fields(channel_cls)}


def check_signature(channel_cls: type[BaseChannel], callback: Callable) -> None:
    """Raise :class:`ListenerSignatureError` unless ``callback`` accepts what the channel sends."""
    try:
        parameters = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return  # builtins and some C callables have no signature to check
    sent = _sent_arguments(channel_cls)
    where = f"Listener {getattr(callback, '__qualname__', callback)!r} of {channel_cls.name()}"
    accepted = set()
    takes_any_keyword = False
    for param in parameters:
        if param.kind is param.VAR_KEYWORD:
            takes_any_keyword = True
        elif param.kind is param.POSITIONAL_ONLY:
            if param.default is param.empty:
                raise ListenerSignatureError(
                    f"{where} has positional-only parameter {param.name!r}; listeners are called "
                    f"with keyword arguments {sorted(sent)}."
                )
        elif param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            accepted.add(param.name)
            if param.default is param.empty and param.name not in sent:
                raise ListenerSignatureError(
                    f"{where} requires {param.name!r}, which the channel does not send; "
                    f"it sends {sorted(sent)}."
                )
    missing = sent - accepted
    if missing and not takes_any_keyword:
        raise ListenerSignatureError(
            f"{where} does not accept {sorted(missing)}; add those parameters (or **kwargs)."
        )


def listener(channel: type[Channel] | str) -> Callable[[F], F]:
    """Run the decorated function for every message of ``channel``."""
    channel_cls = locate_channel(channel)

    def decorate(callback: F) -> F:
        check_signature(channel_cls, callback)
        channel_cls.register(callback)
        return callback

    return decorate


def trigger_listener(channel: type[TriggerChannel] | str, trigger: pgtrigger.Trigger):
    """Install ``trigger`` on the channel's model and run the decorated function for each message."""
    channel_cls = locate_channel(channel)
    model = _trigger_model(channel_cls)

    def decorate(callback: F) -> F:
        check_signature(channel_cls, callback)
        _register_trigger(model, trigger)
        channel_cls.register(callback)
        return callback

    return decorate


def _trigger_model(channel_cls: type[BaseChannel]) -> type[models.Model]:
    model = getattr(channel_cls, "model", None)
    if not (isinstance(model, type) and issubclass(model, models.Model)):
        raise InvalidChannel(
            f"{channel_cls.name()} has no model: set `model = YourModel` on the TriggerChannel."
        )
    return model


def _operation_names(operation: pgtrigger.Operation) -> list[str]:
    inner = getattr(operation, "operations", None)
    if inner:
        return [name for op in inner for name in _operation_names(op)]
    return [str(operation)]


def _register_trigger(model: type[models.Model], trigger: pgtrigger.Trigger) -> None:
    for registered_model, existing in pgtrigger.registered():
        if registered_model is model and existing.name == trigger.name:
            if existing is not trigger and type(existing) is type(trigger):
                # Another listener of the same channel and timing: one trigger covers both.
                names = _operation_names(existing.operation)
                for op_name in _operation_names(trigger.operation):
                    if op_name not in names:
                        existing.operation = existing.operation | trigger.operation
                        names.append(op_name)
            return
    pgtrigger.register(trigger)(model)


def _trigger_action_listener(
    channel: type[TriggerChannel] | str, when: pgtrigger.When, operation: pgtrigger.Operation
):
    from pgpubsub.triggers import LockableNotify, Notify

    channel_cls = locate_channel(channel)
    notify_cls = LockableNotify if channel_cls.lock_notifications else Notify
    listen_name = channel_cls.listen_safe_name()
    # The first timing keeps the plain channel name (as in existing migrations); the other
    # timing of the same channel gets a suffixed trigger name but NOTIFYs the same channel.
    name = listen_name
    for registered_model, existing in pgtrigger.registered():
        if (
            registered_model is getattr(channel_cls, "model", None)
            and existing.name == listen_name
            and existing.when != when
        ):
            name = f"{listen_name}_{str(when).lower()}"
    register = trigger_listener(
        channel_cls,
        trigger=notify_cls(name=name, channel=listen_name, when=when, operation=operation),
    )

    def decorate(callback: F) -> F:
        register(callback)
        _trigger_operations.setdefault((channel_cls, callback), set()).update(
            (str(when), op_name) for op_name in _operation_names(operation)
        )
        return callback

    return decorate


def pre_save_listener(channel: type[TriggerChannel] | str):
    """Run before each INSERT or UPDATE of the channel's model."""
    return _trigger_action_listener(channel, pgtrigger.Before, pgtrigger.Insert | pgtrigger.Update)


def post_save_listener(channel: type[TriggerChannel] | str):
    """Run after each INSERT or UPDATE of the channel's model."""
    return _trigger_action_listener(channel, pgtrigger.After, pgtrigger.Insert | pgtrigger.Update)


def pre_insert_listener(channel: type[TriggerChannel] | str):
    """Run before each INSERT of the channel's model."""
    return _trigger_action_listener(channel, pgtrigger.Before, pgtrigger.Insert)


def post_insert_listener(channel: type[TriggerChannel] | str):
    """Run after each INSERT of the channel's model."""
    return _trigger_action_listener(channel, pgtrigger.After, pgtrigger.Insert)


def pre_update_listener(channel: type[TriggerChannel] | str):
    """Run before each UPDATE of the channel's model."""
    return _trigger_action_listener(channel, pgtrigger.Before, pgtrigger.Update)


def post_update_listener(channel: type[TriggerChannel] | str):
    """Run after each UPDATE of the channel's model."""
    return _trigger_action_listener(channel, pgtrigger.After, pgtrigger.Update)


def pre_delete_listener(channel: type[TriggerChannel] | str):
    """Run before each DELETE of the channel's model."""
    return _trigger_action_listener(channel, pgtrigger.Before, pgtrigger.Delete)


def post_delete_listener(channel: type[TriggerChannel] | str):
    """Run after each DELETE of the channel's model."""
    return _trigger_action_listener(channel, pgtrigger.After, pgtrigger.Delete)

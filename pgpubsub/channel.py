"""Channels: what a message carries, what it is called on the wire, and who listens to it."""

from __future__ import annotations

import dataclasses
import decimal
import functools
import hashlib
import inspect
import json
import logging
import sys
import typing
from collections import defaultdict
from collections.abc import Callable
from pydoc import locate
from typing import Any, ClassVar

from django.db import models

from pgpubsub import channel_options, conf
from pgpubsub.codec import Codec, codec_for
from pgpubsub.context import set_notification_context  # 1.3.1 exported it from here
from pgpubsub.event_loop import call  # async def listeners run on the Runtime's loop
from pgpubsub.exceptions import ChannelNotFound, InvalidChannel, InvalidPayload

logger = logging.getLogger(__name__)

#: Channel class -> its listener callbacks, in registration order.
registry: defaultdict[type[BaseChannel], list[Callable]] = defaultdict(list)

# LISTEN name -> channel class, for registered channels (kept beside ``registry`` for O(1) lookup).
_by_listen_name: dict[str, type[BaseChannel]] = {}

# (trigger channel, callback) -> the (timing, operation) pairs the callback was registered for
# (``post_delete_listener`` -> {("AFTER", "DELETE")}). Callbacks absent here get every message.
_trigger_operations: dict[tuple[type[BaseChannel], Callable], set[tuple[str, str]]] = {}


def listen_name(dotted_name: str) -> str:
    """The Postgres channel name of the channel class at ``dotted_name``: ``pgpubsub_`` and 5
    hex digits of its sha1 (as django-pgpubsub 1.x names them)."""
    return f"pgpubsub_{hashlib.sha1(dotted_name.encode()).hexdigest()[:5]}"


@functools.cache
def _decoder(parse_float: Callable[[str], Any] | None) -> json.JSONDecoder:
    return json.JSONDecoder(parse_float=parse_float)  # json.loads() would build one per call


def _load_json(payload: Any, parse_float: Callable[[str], Any] | None = None) -> Any:
    """Payloads arrive as JSON text, as parsed JSON, or (rows of older versions) as JSON text
    stored inside a JSON string; unwrap until a JSON object remains."""
    while isinstance(payload, str | bytes):
        try:
            if isinstance(payload, bytes):
                payload = json.loads(payload, parse_float=parse_float)
            else:
                payload = _decoder(parse_float).decode(payload)
        except ValueError as exc:
            raise InvalidPayload(f"Payload is not JSON ({exc}): {payload!r:.200}") from None
    return payload


@dataclasses.dataclass
class BaseChannel:
    """Base of every channel. Subclasses are dataclasses whose fields are the message."""

    #: Store each message in ``pgpubsub_notification`` and process it exactly once.
    lock_notifications: ClassVar[bool] = False
    #: At most this many of the channel's messages run at once in a Runtime (None: no limit
    #: but the pool's size). ``1`` runs them one at a time, in arrival order.
    max_concurrency: ClassVar[int | None] = None
    #: The database alias the channel's messages are published, stored, listened to and
    #: processed on (None: ``PGPUBSUB_DATABASE`` for listening and the ``Notification``
    #: model's database for the rest). A trigger channel names its model's database.
    database: ClassVar[str | None] = None
    #: Lockable channels: attempts a message gets before it is marked failed (None:
    #: ``PGPUBSUB_MAX_ATTEMPTS``).
    max_attempts: ClassVar[int | None] = None
    #: Lockable channels: seconds before a failed message's second attempt, doubling for each
    #: later one (None: ``PGPUBSUB_RETRY_DELAY``).
    retry_delay: ClassVar[float | None] = None
    #: Lockable channels: storing a message also sends a NOTIFY in the writer's transaction
    #: (None: ``PGPUBSUB_NOTIFY_ON_WRITE``). Without it, writers only store the row and the
    #: elected watcher wakes the listeners (see docs/delivery.md). Takes effect when
    #: ``migrate`` installs pgpubsub's SQL functions.
    notify_on_write: ClassVar[bool | None] = None
    #: Lockable channels: the retry policy, in place of ``max_attempts`` and ``retry_delay``: a
    #: :class:`pgpubsub.retries.RetryStrategy`, any object with ``next_delay(attempt, error)``
    #: and ``max_attempts``, or the dotted path of one (None: the default policy).
    # Not annotated: a ClassVar annotation here would put a message field called ``retry`` (a
    # django-pgpubsub 1.x channel may have one) first among the fields, before fields without
    # a default, which dataclasses refuse.
    retry = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        channel_options.check(cls)

    def __post_init__(self) -> None:
        self.callbacks: list[Callable] = []

    @classmethod
    def name(cls) -> str:
        """Dotted path of the class, e.g. ``myapp.channels.PostReads``."""
        return f"{inspect.getmodule(cls).__name__}.{cls.__name__}"

    @classmethod
    def listen_safe_name(cls) -> str:
        """The Postgres channel name: ``pgpubsub_`` and 5 hex digits of the sha1 of ``name()``."""
        cached = cls.__dict__.get("_pgpubsub_listen_name")
        if cached is None:
            cached = listen_name(cls.name())
            cls._pgpubsub_listen_name = cached
        return cached

    @classmethod
    def notifies_on_write(cls) -> bool:
        """Storing this lockable channel's messages sends a NOTIFY in the writer's transaction
        (its ``notify_on_write``, else ``PGPUBSUB_NOTIFY_ON_WRITE``)."""
        if cls.notify_on_write is not None:
            return cls.notify_on_write
        return conf.notify_on_write()

    @classmethod
    def get(cls, name: str) -> tuple[type[BaseChannel], list[Callable]] | None:
        """The registered channel class with LISTEN name ``name`` and its callbacks, or None."""
        channel_cls = _by_listen_name.get(name)
        if channel_cls is None:
            return None
        return channel_cls, registry[channel_cls]

    @classmethod
    def register(cls, callback: Callable) -> None:
        """Add ``callback`` to the listeners of this channel."""
        listen_name = cls.listen_safe_name()
        other = _by_listen_name.get(listen_name)
        if other is not None and other is not cls and other.name() != cls.name():
            raise InvalidChannel(
                f"Channels {other.name()} and {cls.name()} share the LISTEN name {listen_name}; "
                "rename one of them."
            )
        if other is not None and other is not cls:
            # The same class defined again (a module reloaded): the newest definition wins.
            registry[cls].extend(registry.pop(other, []))
        _by_listen_name[listen_name] = cls
        if callback not in registry[cls]:
            registry[cls].append(callback)

    @classmethod
    def deserialize(cls, payload: dict | str) -> dict[str, Any]:
        return _load_json(payload)

    @classmethod
    def build_from_payload(cls, notification_payload: dict | str, callbacks: list[Callable]):
        """An instance of the channel built from a payload, carrying ``callbacks``."""
        channel = cls(**cls.deserialize(notification_payload))
        # Set here too: a subclass's __post_init__ may not call ours.
        channel.callbacks = [*getattr(channel, "callbacks", ()), *callbacks]
        return channel

    @property
    def signature(self) -> dict[str, Any]:
        """The keyword arguments each callback receives."""
        names = type(self).__dict__.get("_pgpubsub_field_names")
        if names is None:  # read once per class: dataclasses.fields() costs microseconds
            names = tuple(field.name for field in dataclasses.fields(self))
            type(self)._pgpubsub_field_names = names
        return {name: getattr(self, name) for name in names}

    def execute_callbacks(self) -> None:
        kwargs = self.signature
        for callback in self.callbacks:
            call(callback, kwargs)


def _resolve_hints(cls: type) -> dict[str, Any] | None:
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        return None  # a forward reference not defined yet: checked again on first use
    return {
        name: hint
        for name, hint in hints.items()
        if typing.get_origin(hint) is not ClassVar
        and hint is not ClassVar
        and not isinstance(hint, dataclasses.InitVar)  # constructor arguments, not fields
    }


@dataclasses.dataclass
class Channel(BaseChannel):
    """A channel whose fields are sent with :func:`pgpubsub.notify`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hints = _resolve_hints(cls)
        if hints is not None:
            cls._pgpubsub_codecs = cls._build_codecs(hints)

    @classmethod
    def _build_codecs(cls, hints: dict[str, Any]) -> dict[str, Codec]:
        return {name: codec_for(hint, f"{cls.__qualname__}.{name}") for name, hint in hints.items()}

    @classmethod
    def codecs(cls) -> dict[str, Codec]:
        """Field name -> codec, for the dataclass fields of this channel."""
        cached = cls.__dict__.get("_pgpubsub_codecs")
        if cached is None or "_pgpubsub_fields_checked" not in cls.__dict__:
            hints = _resolve_hints(cls)
            if hints is None:
                hints = typing.get_type_hints(cls)  # raises the NameError for the user to see
            # Fields set in __post_init__ (init=False) are not sent: the receiver computes them.
            field_names = {field.name for field in dataclasses.fields(cls) if field.init}
            cached = cls._build_codecs({k: v for k, v in hints.items() if k in field_names})
            cls._pgpubsub_codecs = cached
            cls._pgpubsub_fields_checked = True
        return cached

    def serialize(self) -> str:
        """The JSON text of this message: ``{"kwargs": {field: value, ...}}``."""
        return json.dumps(
            {"kwargs": self.encode_fields()}, ensure_ascii=False, separators=(",", ":")
        )

    def encode_fields(self) -> dict[str, Any]:
        codecs = self.codecs()
        return {
            name: codec.encode(getattr(self, name), f"{type(self).__qualname__}.{name}")
            for name, codec in codecs.items()
        }

    @classmethod
    def deserialize(cls, payload: dict | str) -> dict[str, Any]:
        """Field values of the declared types, from a payload made by :meth:`serialize`."""
        data = _load_json(payload)
        if not isinstance(data, dict) or not isinstance(data.get("kwargs"), dict):
            raise InvalidPayload(f"{cls.name()}: payload has no 'kwargs' object: {data!r:.200}")
        values = {}
        for name, codec in cls.codecs().items():
            if name in data["kwargs"]:
                values[name] = codec.decode(data["kwargs"][name], f"{cls.__qualname__}.{name}")
        missing = [name for name in cls._required_fields() if name not in values]
        if missing:
            raise InvalidPayload(
                f"{cls.name()}: payload lacks the field(s) {', '.join(missing)}: {data!r:.200}"
            )
        return values

    @classmethod
    def _required_fields(cls) -> list[str]:
        """The fields a message cannot be built without (they have no default)."""
        cached = cls.__dict__.get("_pgpubsub_required")
        if cached is None:
            cached = [
                field.name
                for field in dataclasses.fields(cls)
                if field.init
                and field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ]
            cls._pgpubsub_required = cached
        return cached


@dataclasses.dataclass
class TriggerChannel(BaseChannel):
    """A channel fed by a database trigger on ``model``; listeners get ``old`` and ``new``."""

    model: ClassVar[type[models.Model] | Any] = NotImplementedError
    old: models.Model | None
    new: models.Model | None
    context: dict[str, Any] | None = None
    #: ``BEFORE`` or ``AFTER``: when the trigger that sent the message fired (None in messages
    #: from versions that did not send it).
    when: str | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _model_from_annotation(cls)

    @classmethod
    def build_from_payload(cls, notification_payload: dict | str, callbacks: list[Callable]):
        # Parsed once, here: deserialize() gets the parsed object and the timing is read from it.
        data = _load_json(notification_payload, parse_float=decimal.Decimal)
        channel = super().build_from_payload(data, callbacks)
        channel.when = data.get("when")
        return channel

    @classmethod
    def pass_context_to_listeners(cls) -> bool:
        return conf.pass_context_to_listeners()

    @property
    def signature(self) -> dict[str, Any]:
        kwargs = {"old": self.old, "new": self.new}
        if self.pass_context_to_listeners():
            kwargs["context"] = self.context
        return kwargs

    @property
    def operation(self) -> str:
        """``INSERT``, ``UPDATE`` or ``DELETE``, as told by which row images are present."""
        if self.old is None:
            return "INSERT"
        return "DELETE" if self.new is None else "UPDATE"

    def execute_callbacks(self) -> None:
        """Call each callback registered for this message's timing and operation (a channel
        with a ``pre_save_listener``, a ``post_save_listener`` and a ``post_delete_listener``
        gives each only its own rows, once)."""
        kwargs = self.signature
        operation, when = self.operation, self.when
        for callback in self.callbacks:
            wanted = _trigger_operations.get((type(self), callback))
            if wanted is None or any(
                op == operation and (when is None or timing == when) for timing, op in wanted
            ):
                call(callback, kwargs)

    @classmethod
    def deserialize(cls, payload: dict | str) -> dict[str, Any]:
        """``{'old': ..., 'new': ...}`` as unsaved model instances (and ``context`` when passed)."""
        from pgpubsub.row_images import instance_from_row, model_for_payload

        # Decimal keeps numeric columns exact; float columns are converted back by their field.
        data = _load_json(payload, parse_float=decimal.Decimal)
        if not isinstance(data, dict):
            raise InvalidPayload(
                f"{cls.name()}: trigger payload is not a JSON object: {data!r:.200}"
            )
        model = model_for_payload(cls, data)
        fields = {
            "old": instance_from_row(model, data.get("old")),
            "new": instance_from_row(model, data.get("new")),
        }
        if cls.pass_context_to_listeners():
            fields["context"] = data.get("context") or {}
        return fields


def _model_from_annotation(cls: type[TriggerChannel]) -> None:
    """``model: Post`` in a trigger channel means ``model = Post`` (django-pgpubsub 1.x accepted
    it): the annotation would otherwise make ``model`` a dataclass field, one without a default
    after the defaulted ``context`` (a TypeError when the class is defined)."""
    annotations = dict(inspect.get_annotations(cls))
    if "model" not in annotations:
        return
    hint = annotations.pop("model")
    cls.__annotations__ = annotations
    if "model" in cls.__dict__:
        return  # ``model: type[Post] = Post``: the value says it
    if isinstance(hint, str):  # postponed annotations: evaluate it where the class is defined
        namespace = dict(vars(sys.modules[cls.__module__]))
        try:
            hint = eval(hint, namespace)  # noqa: S307 - the class's own annotation
        except Exception as exc:
            raise InvalidChannel(
                f"{cls.__qualname__}: cannot resolve the annotation model: {hint} ({exc}); "
                "write `model = YourModel` instead"
            ) from None
    if typing.get_origin(hint) is type:  # model: type[Post]
        (hint,) = typing.get_args(hint)
    if typing.get_origin(hint) is ClassVar:
        return  # a ClassVar is not a field; the inherited value stands
    cls.model = hint


def locate_channel(channel: type[BaseChannel] | str) -> type[BaseChannel]:
    """The channel class itself, or the class at a dotted path."""
    if isinstance(channel, str):
        located = _by_listen_name.get(channel) or locate(channel) or _registered_as(channel)
        if located is None:
            raise ChannelNotFound(f"Channel not found! No channel class at {channel!r}.")
        channel = located
    if not (isinstance(channel, type) and issubclass(channel, BaseChannel)):
        raise ChannelNotFound(f"Channel not found! {channel!r} is not a pgpubsub channel class.")
    return channel


def _registered_as(name: str) -> type[BaseChannel] | None:
    """A registered channel whose name() is ``name`` but is not at that path (task queues)."""
    return next((cls for cls in registry if cls.name() == name), None)


def select_channels(
    channels: list[type[BaseChannel] | str] | None = None,
) -> dict[type[BaseChannel], list[Callable]]:
    """Registered channels (with listeners), all of them or those that are subclasses of
    ``channels``."""
    if channels is None:
        return {cls: callbacks for cls, callbacks in registry.items() if callbacks}
    wanted = tuple(locate_channel(channel) for channel in channels)
    return {
        cls: callbacks
        for cls, callbacks in registry.items()
        if callbacks and issubclass(cls, wanted)
    }


__all__ = [
    "BaseChannel",
    "Channel",
    "ChannelNotFound",
    "TriggerChannel",
    "locate_channel",
    "registry",
    "select_channels",
    "set_notification_context",
]

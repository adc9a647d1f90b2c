"""Type-driven conversion between channel field values and JSON.

Each declared field type gets a :class:`Codec` once, when the channel is defined, so a field that
cannot round-trip is refused up front and no type inspection happens per message.

Encodings (chosen so that every supported value comes back equal, with the same type):

- ``str``, ``int``, ``bool``, ``None``: themselves. ``float``: a JSON number, or the strings
  ``"nan"``, ``"inf"``, ``"-inf"``, ``"-0.0"`` where JSON and ``jsonb`` cannot hold the value.
- ``Decimal``, ``UUID``: their ``str()``. ``date``, ``time``, ``datetime``: ISO 8601; an aware
  datetime in a ``zoneinfo`` zone is followed by the zone key in brackets
  (``2024-07-01T12:00:00+02:00[Europe/Paris]``) so the zone itself survives.
- ``Enum``: the member's value (which must be a JSON scalar).
- ``list``/``tuple``/``set``/``frozenset``: a JSON array. ``dict``: a JSON object; keys that do
  not encode to strings are written as their JSON text (``{"1": ...}`` for ``int`` keys);
  ``dict[Any, ...]`` takes JSON scalar keys.
- ``Any``, ``object``, bare ``dict``/``list``: JSON values, checked when sent.

(Over 400 lines on purpose: the encodings above are one table, each type's encoder and decoder
side by side; split by type, the round-trip rules would be scattered.)
"""

from __future__ import annotations

import datetime
import decimal
import enum
import math
import re
import types
import typing
import uuid
import zoneinfo
from collections.abc import Callable
from typing import Any

from pgpubsub.exceptions import InvalidChannel, InvalidPayload

_JSON_SCALARS = (str, int, float, bool, type(None))
_ZONE_SUFFIX = re.compile(r"^(?P<iso>.*)\[(?P<zone>[^\]]+)\]$")


class Codec:
    """Encoder and decoder for one declared type.

    ``stringy`` is true when every encoded value is a JSON string (such values can be dict keys).
    """

    __slots__ = ("name", "encode", "decode", "stringy")

    def __init__(
        self,
        name: str,
        encode: Callable[[Any, str], Any],
        decode: Callable[[Any, str], Any],
        stringy: bool = False,
    ) -> None:
        self.name = name
        self.encode = encode
        self.decode = decode
        self.stringy = stringy


def _fail(where: str, expected: str, value: Any) -> typing.NoReturn:
    try:
        shown = f"{value!r:.80}"
    except ValueError:  # an int too long for repr()
        shown = "(too long to show)"
    raise InvalidPayload(f"{where}: expected {expected}, got {type(value).__name__} {shown}")


# --- scalars -------------------------------------------------------------------------------------


# Values a ``str`` field takes and converts, as django-pgpubsub 1.x did (its listeners got
# ``str(value)``).
_STR_CONVERTIBLE = (int, float, decimal.Decimal, uuid.UUID)


def _encode_str(value: Any, where: str) -> str:
    if isinstance(value, _STR_CONVERTIBLE) and not isinstance(value, bool):
        try:
            value = str(value)
        except ValueError:  # an int too long for str()
            _fail(where, "str", value)
    if not isinstance(value, str):
        _fail(where, "str", value)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidPayload(f"{where}: text is not valid Unicode (lone surrogate)") from None
    if "\x00" in value:
        raise InvalidPayload(f"{where}: text contains U+0000 (NUL), which PostgreSQL cannot store")
    return value


def _decode_str(value: Any, where: str) -> str:
    if isinstance(value, int | float | decimal.Decimal):  # stored by 1.x from a number
        return str(value)
    if not isinstance(value, str):
        _fail(where, "a JSON string", value)
    return value


# Integers longer than this many bits may exceed Python's limit on int <-> str conversion.
_LONG_INT_BITS = 4000


def _encode_int(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("+-").isdecimal():
        value = int(value)  # as django-pgpubsub 1.x, whose listeners got int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, "int", value)
    value = int(value)
    if value.bit_length() > _LONG_INT_BITS:
        try:
            str(value)
        except ValueError:
            raise InvalidPayload(
                f"{where}: integer of {value.bit_length()} bits is too long to write as JSON text"
            ) from None
    return value


def _decode_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        _fail(where, "an integer", value)
    if isinstance(value, int):
        return value
    if isinstance(value, str | decimal.Decimal | float):
        try:
            number = decimal.Decimal(value)
            if number == number.to_integral_value():
                return int(number)
        except (decimal.InvalidOperation, ValueError):
            pass
    _fail(where, "an integer", value)


def _encode_float(value: Any, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(where, "float", value)
    try:
        value = float(value)
    except OverflowError:
        raise InvalidPayload(
            f"{where}: integer of {value.bit_length()} bits is too large for a float"
        ) from None
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0.0 and math.copysign(1.0, value) < 0:
        return "-0.0"
    return value


def _decode_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        _fail(where, "a number", value)
    # float() reads the special strings ("nan", "inf", "-inf", "-0.0") itself, and makes a new
    # object for each nan, so a set of several nans keeps all of them.
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        _fail(where, "a number", value)


def _encode_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        _fail(where, "bool", value)
    return value


def _decode_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        _fail(where, "true or false", value)
    return value


def _encode_none(value: Any, where: str) -> None:
    if value is not None:
        _fail(where, "None", value)
    return None


def _encode_decimal(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, decimal.Decimal | int):
        _fail(where, "Decimal", value)
    return str(value)


def _decode_decimal(value: Any, where: str) -> decimal.Decimal:
    if isinstance(value, bool):
        _fail(where, "a decimal number", value)
    if isinstance(value, float):
        value = repr(value)
    try:
        return decimal.Decimal(value)
    except (decimal.InvalidOperation, TypeError, ValueError):
        _fail(where, "a decimal number", value)


def _encode_uuid(value: Any, where: str) -> str:
    if not isinstance(value, uuid.UUID):
        _fail(where, "UUID", value)
    return str(value)


def _decode_uuid(value: Any, where: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        _fail(where, "a UUID string", value)


def _encode_date(value: Any, where: str) -> str:
    if not isinstance(value, datetime.date) or isinstance(value, datetime.datetime):
        _fail(where, "date", value)
    return value.isoformat()


def _decode_date(value: Any, where: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(value)
    except (TypeError, ValueError):
        _fail(where, "an ISO 8601 date", value)


def _encode_time(value: Any, where: str) -> str:
    if not isinstance(value, datetime.time):
        _fail(where, "time", value)
    if value.tzinfo is not None and value.utcoffset() is None:
        raise InvalidPayload(
            f"{where}: a time's tzinfo must have a fixed offset, got {value.tzinfo}"
        )
    return value.isoformat()


def _decode_time(value: Any, where: str) -> datetime.time:
    try:
        return datetime.time.fromisoformat(value)
    except (TypeError, ValueError):
        _fail(where, "an ISO 8601 time", value)


def _encode_datetime(value: Any, where: str) -> str:
    if not isinstance(value, datetime.datetime):
        _fail(where, "datetime", value)
    if isinstance(value.tzinfo, zoneinfo.ZoneInfo) and value.tzinfo.key:
        return f"{value.isoformat()}[{value.tzinfo.key}]"
    if value.tzinfo is not None and not isinstance(value.tzinfo, datetime.timezone):
        # Other tzinfo classes (pytz, dateutil, keyless ZoneInfo) keep their offset; the zone
        # itself is not portable. replace(), not astimezone(): no overflow near datetime.max.
        offset = value.utcoffset()
        fixed = None if offset is None else datetime.timezone(offset)
        value = value.replace(tzinfo=fixed)
    return value.isoformat()


def _decode_datetime(value: Any, where: str) -> datetime.datetime:
    if not isinstance(value, str):
        _fail(where, "an ISO 8601 datetime", value)
    zone = None
    match = _ZONE_SUFFIX.match(value)
    if match:
        value, zone = match.group("iso"), match.group("zone")
    text = value
    if text.endswith(("Z", "z")):
        # Django's JSON encoder (django-pgpubsub 1.x payloads) writes UTC as "Z", which
        # fromisoformat() reads only from Python 3.11 on.
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        _fail(where, "an ISO 8601 datetime", value)
    if zone is None or parsed.tzinfo is None:
        return parsed
    return _in_zone(parsed, zone)


def _in_zone(parsed: datetime.datetime, key: str) -> datetime.datetime:
    """``parsed`` (aware, fixed offset) with its zone ``key`` attached, keeping the wall time,
    the offset and so the fold, also for times a DST change skips or repeats."""
    try:
        zone = zoneinfo.ZoneInfo(key)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return parsed  # the offset alone still gives the right instant
    offset = parsed.utcoffset()
    for fold in (0, 1):
        local = parsed.replace(tzinfo=zone, fold=fold)
        if local.utcoffset() == offset:
            return local
    try:  # the zone's rules changed since the value was sent: same instant, new wall time
        return parsed.astimezone(zone)
    except OverflowError:
        return parsed


_SCALARS: dict[Any, Codec] = {
    str: Codec("str", _encode_str, _decode_str, stringy=True),
    int: Codec("int", _encode_int, _decode_int),
    float: Codec("float", _encode_float, _decode_float),
    bool: Codec("bool", _encode_bool, _decode_bool),
    type(None): Codec("None", _encode_none, lambda value, where: _encode_none(value, where)),
    decimal.Decimal: Codec("Decimal", _encode_decimal, _decode_decimal, stringy=True),
    uuid.UUID: Codec("UUID", _encode_uuid, _decode_uuid, stringy=True),
    datetime.date: Codec("date", _encode_date, _decode_date, stringy=True),
    datetime.time: Codec("time", _encode_time, _decode_time, stringy=True),
    datetime.datetime: Codec("datetime", _encode_datetime, _decode_datetime, stringy=True),
}


# --- JSON values (Any, bare containers) ----------------------------------------------------------


def _check_json(value: Any, where: str) -> Any:
    if isinstance(value, str):
        return _encode_str(value, where)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidPayload(
                f"{where}: {value!r} is not a JSON number; declare the field float"
            )
        return value
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, list | tuple):
        return [_check_json(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidPayload(f"{where}: JSON object keys must be str, got {key!r}")
            out[_encode_str(key, where)] = _check_json(item, f"{where}[{key!r}]")
        return out
    raise InvalidPayload(
        f"{where}: {type(value).__name__} is not a JSON value; declare the field with a precise "
        "type (for example list[datetime]) so pgpubsub can convert it"
    )


def _encode_json_key(value: Any, where: str) -> Any:
    # A key must come back hashable: JSON arrays and objects would decode to list and dict.
    if isinstance(value, list | tuple | dict):
        raise InvalidPayload(
            f"{where}: {value!r:.80} cannot be a key of an Any-keyed dict; declare the key type "
            "(for example dict[tuple[int, int], str])"
        )
    return _check_json(value, where)


_JSON_KEY = Codec("JSON scalar", _encode_json_key, lambda value, where: value)


def _json_codec(name: str, container: type | None = None) -> Codec:
    def encode(value: Any, where: str) -> Any:
        if container is not None and not isinstance(value, container):
            _fail(where, name, value)
        return _check_json(value, where)

    def decode(value: Any, where: str) -> Any:
        if container is not None and not isinstance(value, container):
            _fail(where, f"a JSON {name}", value)
        return value

    return Codec(name, encode, decode)


# --- composites ----------------------------------------------------------------------------------


def _enum_codec(enum_cls: type[enum.Enum], where: str) -> Codec:
    members = list(enum_cls)
    for member in members:
        if not isinstance(member.value, _JSON_SCALARS) or (
            isinstance(member.value, float) and not math.isfinite(member.value)
        ):
            raise InvalidChannel(
                f"{where}: {enum_cls.__name__}.{member.name} has value {member.value!r}; enum "
                "values must be str, int, float, bool or None to travel as JSON"
            )
    stringy = all(isinstance(member.value, str) for member in members)

    def encode(value: Any, where: str) -> Any:
        if not isinstance(value, enum_cls):
            _fail(where, enum_cls.__name__, value)
        return value.value

    def decode(value: Any, where: str) -> Any:
        try:
            return enum_cls(value)
        except ValueError:
            _fail(where, f"a value of {enum_cls.__name__}", value)

    return Codec(enum_cls.__name__, encode, decode, stringy=stringy)


def _optional_codec(inner: Codec, where: str) -> Codec:
    try:
        null_value = inner.decode(None, where)
    except (InvalidPayload, TypeError, ValueError):
        pass
    else:
        if null_value is not None:
            raise InvalidChannel(
                f"{where}: Optional[{inner.name}] is ambiguous, {null_value!r} is also sent as "
                "null; drop Optional or give that value another representation"
            )

    def encode(value: Any, where: str) -> Any:
        return None if value is None else inner.encode(value, where)

    def decode(value: Any, where: str) -> Any:
        return None if value is None else inner.decode(value, where)

    return Codec(f"Optional[{inner.name}]", encode, decode)


def _sequence_codec(origin: type, item: Codec) -> Codec:
    accepted = (list, tuple, set, frozenset) if origin in (set, frozenset) else (list, tuple)

    def encode(value: Any, where: str) -> list:
        if not isinstance(value, accepted):
            _fail(where, origin.__name__, value)
        return [item.encode(element, f"{where}[{i}]") for i, element in enumerate(value)]

    def decode(value: Any, where: str) -> Any:
        if not isinstance(value, list):
            _fail(where, "a JSON array", value)
        return origin(item.decode(element, f"{where}[{i}]") for i, element in enumerate(value))

    return Codec(f"{origin.__name__}[{item.name}]", encode, decode)


def _tuple_codec(items: list[Codec]) -> Codec:
    def encode(value: Any, where: str) -> list:
        if not isinstance(value, list | tuple) or len(value) != len(items):
            _fail(where, f"a tuple of {len(items)} items", value)
        return [
            codec.encode(element, f"{where}[{i}]")
            for i, (codec, element) in enumerate(zip(items, value, strict=True))
        ]

    def decode(value: Any, where: str) -> tuple:
        if not isinstance(value, list) or len(value) != len(items):
            _fail(where, f"a JSON array of {len(items)} items", value)
        return tuple(
            codec.decode(element, f"{where}[{i}]")
            for i, (codec, element) in enumerate(zip(items, value, strict=True))
        )

    return Codec(f"tuple[{', '.join(codec.name for codec in items)}]", encode, decode)


def _dict_codec(key: Codec, val: Codec) -> Codec:
    import json

    def encode_key(value: Any, where: str) -> str:
        encoded = key.encode(value, where)
        return encoded if key.stringy else json.dumps(encoded, separators=(",", ":"))

    def decode_key(text: str, where: str) -> Any:
        if key.stringy:
            return key.decode(text, where)
        try:
            raw = json.loads(text)
        except ValueError:
            raw = text  # keys written by other encoders: let the key codec judge
        return key.decode(raw, where)

    def encode(value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            _fail(where, "dict", value)
        return {
            encode_key(k, f"{where} key"): val.encode(v, f"{where}[{k!r}]")
            for k, v in value.items()
        }

    def decode(value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            _fail(where, "a JSON object", value)
        return {
            decode_key(k, f"{where} key"): val.decode(v, f"{where}[{k!r}]")
            for k, v in value.items()
        }

    return Codec(f"dict[{key.name}, {val.name}]", encode, decode)


def codec_for(tp: Any, where: str) -> Codec:
    """Build the codec of a declared type, or raise :class:`InvalidChannel` naming ``where``."""
    if tp in _SCALARS:
        return _SCALARS[tp]
    if tp is Any or tp is object:
        return _json_codec("JSON value")
    if tp in (dict, typing.Dict):  # noqa: UP006 - the bare typing alias is a distinct object
        return _json_codec("object", dict)
    if tp in (list, typing.List):  # noqa: UP006
        return _json_codec("array", list)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_codec(tp, where)

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        non_none = [arg for arg in args if arg is not type(None)]
        if len(non_none) == 1 and len(args) == 2:
            return _optional_codec(codec_for(non_none[0], where), where)
        raise InvalidChannel(
            f"{where}: Union types other than Optional[X] are ambiguous in JSON; use one type"
        )
    if origin in (list, set, frozenset):
        if len(args) != 1:
            raise InvalidChannel(f"{where}: {origin.__name__} needs one item type")
        return _sequence_codec(origin, codec_for(args[0], f"{where}[]"))
    if origin is tuple:
        if tp is typing.Tuple:  # noqa: UP006 - bare: its items are unknown
            raise InvalidChannel(
                f"{where}: tuple needs item types, e.g. tuple[int, str] or tuple[int, ...]"
            )
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1 and args[0] != ():
            # tuple[X] is read as tuple[X, ...]: django-pgpubsub 1.x took it for a tuple of
            # any length (a one-item tuple still round-trips).
            return _sequence_codec(tuple, codec_for(args[0], f"{where}[]"))
        if not args or args == ((),):
            return _tuple_codec([])
        return _tuple_codec([codec_for(arg, f"{where}[{i}]") for i, arg in enumerate(args)])
    if origin is dict:
        if len(args) != 2:
            raise InvalidChannel(f"{where}: dict needs a key and a value type")
        if args[0] is Any or args[0] is object:
            key = _JSON_KEY
        else:
            key = codec_for(args[0], f"{where} key")
        return _dict_codec(key, codec_for(args[1], f"{where}[]"))
    raise InvalidChannel(
        f"{where}: type {tp!r} cannot be sent through a channel. Supported: str, int, float, bool, "
        "None, Decimal, date, datetime, time, UUID, Enum, and list/tuple/set/dict/Optional of "
        "those, or Any for plain JSON values."
    )

"""Channel field (de)serialisation: every supported type round-trips exactly; everything else is
refused when the channel is defined or when a message is sent, naming the field."""

import dataclasses
import datetime
import enum
import json
import math
import re
import typing
import uuid
import zoneinfo
from decimal import Decimal
from typing import Any, NamedTuple, Optional, Union

import pytest
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pgpubsub
from pgpubsub.channel import Channel
from pgpubsub.exceptions import InvalidChannel, InvalidPayload
from tests.testapp.channels import Colour, Everything

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
NEW_YORK = zoneinfo.ZoneInfo("America/New_York")
UTC = datetime.timezone.utc


class Shade(str, enum.Enum):
    LIGHT = "light"
    DARK = "dark"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mixed(enum.Enum):
    NUMBER = 7
    TEXT = "seven"
    RATIO = 7.5
    NO = False


class WithNone(enum.Enum):
    NOTHING = None
    SOMETHING = "something"


# --- comparing values exactly ----------------------------------------------------------------


def short(value: Any) -> str:
    """A test id for any value (repr() refuses very long ints)."""
    try:
        return repr(value)[:40]
    except ValueError:
        return type(value).__name__


def same(a: Any, b: Any) -> bool:
    """Equal, of the same type, and equal in what ``==`` ignores: a Decimal's exponent, the sign
    of zero, nan, a datetime's offset and zone, an enum member's identity."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, Decimal):
        return a.compare_total(b) == 0  # also exact for NaN, sNaN, -0 and trailing zeros
    if isinstance(a, datetime.datetime | datetime.time):
        return (
            a.replace(tzinfo=None, fold=0) == b.replace(tzinfo=None, fold=0)
            and a.utcoffset() == b.utcoffset()
            and same_zone(a.tzinfo, b.tzinfo)
        )
    if isinstance(a, enum.Enum):
        return a is b
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, set | frozenset):
        return matched(list(a), list(b), same)
    if isinstance(a, dict):
        return matched(
            list(a.items()),
            list(b.items()),
            lambda x, y: same(x[0], y[0]) and same(x[1], y[1]),
        )
    return a == b


def same_zone(a: datetime.tzinfo | None, b: datetime.tzinfo | None) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, zoneinfo.ZoneInfo) and a.key:
        return isinstance(b, zoneinfo.ZoneInfo) and b.key == a.key
    return True  # a fixed offset: compared through utcoffset()


def matched(left: list, right: list, equal) -> bool:
    """Every item of ``left`` pairs with its own item of ``right`` (``same`` is exact, so a
    greedy pairing is enough)."""
    if len(left) != len(right):
        return False
    remaining = list(right)
    for item in left:
        for index, candidate in enumerate(remaining):
            if equal(item, candidate):
                del remaining[index]
                break
        else:
            return False
    return True


def test_same_sees_what_equality_ignores():
    """The comparison itself must fail where a round trip loses information."""
    assert not same(Decimal("1.10"), Decimal("1.1"))
    assert not same(-0.0, 0.0)
    assert same(math.nan, float("nan"))
    assert not same(1, 1.0)
    assert not same(True, 1)
    moment = datetime.datetime(2024, 7, 1, 12, tzinfo=PARIS)
    assert not same(moment, moment.astimezone(UTC))
    assert not same(moment, moment.astimezone(datetime.timezone(datetime.timedelta(hours=2))))
    assert not same(moment.replace(tzinfo=None), moment)
    assert not same({1: Decimal("1.0")}, {1: Decimal("1.00")})
    assert not same({math.nan, float("nan")}, {math.nan})
    assert not same([Priority.LOW], [1])


# --- channels of any field type ----------------------------------------------------------------

_channels: dict[Any, type[Channel]] = {}


def channel_for(tp: Any) -> type[Channel]:
    """A channel with one field ``value`` of type ``tp`` (defining one registers nothing)."""
    if tp not in _channels:
        _channels[tp] = dataclasses.make_dataclass(
            "Holder", [("value", tp)], bases=(Channel,), namespace={"__module__": __name__}
        )
    return _channels[tp]


def round_trip(tp: Any, value: Any) -> Any:
    cls = channel_for(tp)
    payload = cls(value=value).serialize()
    assert json.loads(payload)["kwargs"].keys() == {"value"}
    return cls.deserialize(payload)["value"]


class Spec(NamedTuple):
    """A field type, a strategy for its values, and one for its values as dict keys or set
    items (None when its values are not hashable)."""

    tp: Any
    values: st.SearchStrategy
    keys: st.SearchStrategy | None


def _exact_decimals():
    # Explicit digits and exponents: Decimal("1.10"), Decimal("-0E+3"), Decimal("1E-40"), ...
    return st.builds(
        lambda sign, digits, exponent: Decimal((sign, tuple(digits), exponent)),
        st.integers(0, 1),
        st.lists(st.integers(0, 9), min_size=1, max_size=40),
        st.integers(-60, 60),
    )


# Whole seconds (as in historical zones, e.g. +09:18:59): Python's ISO parser drops an offset's
# microseconds in some cases, and no real zone has them.
FIXED_OFFSETS = st.integers(-86399, 86399).map(
    lambda seconds: datetime.timezone(datetime.timedelta(seconds=seconds))
) | st.just(UTC)
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"))  # no lone surrogates
DECIMALS = st.decimals() | _exact_decimals()
DATETIMES = st.one_of(
    st.datetimes(),
    st.datetimes(timezones=st.timezones()),
    st.datetimes(timezones=FIXED_OFFSETS),
)
TIMES = st.times() | st.times(timezones=FIXED_OFFSETS)


def _scalar(tp, values, hashable=True):
    return Spec(tp, values, values if hashable else None)


SCALARS = [
    _scalar(str, TEXT),
    _scalar(int, st.integers()),
    _scalar(float, st.floats()),
    _scalar(bool, st.booleans()),
    _scalar(type(None), st.none()),
    Spec(Decimal, DECIMALS, DECIMALS.filter(lambda d: not d.is_snan())),  # sNaN has no hash
    _scalar(datetime.date, st.dates()),
    _scalar(datetime.datetime, DATETIMES),
    _scalar(datetime.time, TIMES),
    _scalar(uuid.UUID, st.uuids()),
    _scalar(Colour, st.sampled_from(Colour)),
    _scalar(Shade, st.sampled_from(Shade)),
    _scalar(Priority, st.sampled_from(Priority)),
    _scalar(Mixed, st.sampled_from(Mixed)),
]


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    hashable = children.filter(lambda spec: spec.keys is not None)

    def small_lists(spec):
        return st.lists(spec.values, max_size=4)

    def tuple_spec(pair):
        a, b = pair
        keys = None if a.keys is None or b.keys is None else st.tuples(a.keys, b.keys)
        return Spec(tuple[a.tp, b.tp], st.tuples(a.values, b.values), keys)

    def frozenset_spec(spec):
        values = st.frozensets(spec.keys, max_size=4)
        return Spec(frozenset[spec.tp], values, values)

    def dict_spec(pair):
        key, value = pair
        return Spec(
            dict[key.tp, value.tp], st.dictionaries(key.keys, value.values, max_size=4), None
        )

    def optional_spec(spec):
        keys = None if spec.keys is None else st.none() | spec.keys
        return Spec(Optional[spec.tp], st.none() | spec.values, keys)  # noqa: UP045

    return st.one_of(
        children.map(lambda spec: Spec(list[spec.tp], small_lists(spec), None)),
        children.map(
            lambda spec: Spec(
                tuple[spec.tp, ...],
                small_lists(spec).map(tuple),
                None if spec.keys is None else st.lists(spec.keys, max_size=4).map(tuple),
            )
        ),
        hashable.map(lambda spec: Spec(set[spec.tp], st.sets(spec.keys, max_size=4), None)),
        hashable.map(frozenset_spec),
        st.tuples(children, children).map(tuple_spec),
        st.tuples(hashable, children).map(dict_spec),
        children.map(optional_spec),
    )


SPECS = st.recursive(st.sampled_from(SCALARS), _containers, max_leaves=5)


@st.composite
def typed_values(draw):
    spec = draw(SPECS)
    return spec.tp, draw(spec.values)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(typed_values())
@example((list[dict[str, Decimal]], [{"a": Decimal("1.10"), "b": Decimal("-0.000")}, {}]))
@example((dict[int, datetime.date], {-1: datetime.date(2024, 2, 29), 10**30: datetime.date.min}))
@example((Optional[list[uuid.UUID]], [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)]))  # noqa: UP045
@example((Optional[list[uuid.UUID]], None))  # noqa: UP045
@example((tuple[str, int], ("", -(2**70))))
@example((set[str], {"", "a", "ü"}))
@example((frozenset[float], frozenset({math.nan, float("nan"), -0.0, math.inf})))
@example((tuple[int, ...], (1, 2, 3)))
@example((tuple[int, ...], ()))
@example((dict[uuid.UUID, int], {uuid.UUID(int=5): 5}))
@example((dict[datetime.date, str], {datetime.date(1, 1, 1): "min", datetime.date.max: "max"}))
@example((frozenset[str], frozenset({"a", "b"})))
@example((dict[Colour, Priority], {Colour.RED: Priority.HIGH}))
@example((dict[Priority, str], {Priority.LOW: "low"}))
@example((dict[Mixed, int], {member: index for index, member in enumerate(Mixed)}))
@example((dict[float, bool], {1.5: True, -0.0: False, math.inf: True, math.nan: False}))
@example((dict[bool, int], {True: 1, False: 0}))
@example((dict[tuple[int, str], float], {(1, "a"): 1e-300, (2, "b"): 1.7976931348623157e308}))
@example((dict[Optional[int], int], {None: 0, 1: 1}))  # noqa: UP045
@example((dict[datetime.datetime, datetime.time], {datetime.datetime(2024, 7, 1, tzinfo=PARIS): datetime.time(23, 59, 59, 999999)}))  # fmt: skip
def test_every_supported_type_round_trips_exactly(typed_value):
    tp, value = typed_value
    assert same(round_trip(tp, value), value)


@pytest.mark.parametrize("spec", SCALARS, ids=lambda spec: getattr(spec.tp, "__name__", "?"))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_each_scalar_type_round_trips_exactly(spec, data):
    value = data.draw(spec.values)
    assert same(round_trip(spec.tp, value), value)
    assert same(round_trip(Optional[spec.tp], value), value)  # noqa: UP045
    assert same(round_trip(spec.tp | None, value), value)
    assert same(round_trip(spec.tp | None, None), None)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=10,
)  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(JSON_VALUES)
def test_any_fields_carry_json_values_unchanged(value):
    assert same(round_trip(Any, value), value)
    assert same(round_trip(list, [value]), [value])
    assert same(round_trip(dict, {"k": value}), {"k": value})
    assert same(round_trip(dict[str, Any], {"k": value}), {"k": value})


def test_values_that_equality_would_not_notice():
    assert str(round_trip(Decimal, Decimal("1.10"))) == "1.10"
    assert str(round_trip(Decimal, Decimal("-0E+5"))) == "-0E+5"
    assert round_trip(Decimal, Decimal("sNaN")).is_snan()
    assert math.copysign(1.0, round_trip(float, -0.0)) == -1.0
    assert math.isnan(round_trip(float, math.nan))
    assert round_trip(float, -math.inf) == -math.inf
    assert len(round_trip(set[float], {math.nan, float("nan")})) == 2

    moment = datetime.datetime(2024, 7, 1, 12, 0, 0, 123456, tzinfo=PARIS)
    decoded = round_trip(datetime.datetime, moment)
    assert decoded.tzinfo is PARIS  # ZoneInfo instances are cached per key
    assert decoded.tzinfo.key == "Europe/Paris"
    assert decoded.microsecond == 123456

    naive = datetime.datetime(2024, 7, 1, 12, 0, 0, 1)
    assert round_trip(datetime.datetime, naive).tzinfo is None
    assert round_trip(datetime.datetime, naive) == naive

    offset = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    decoded = round_trip(datetime.datetime, datetime.datetime(2024, 1, 1, tzinfo=offset))
    assert decoded.utcoffset() == datetime.timedelta(hours=5, minutes=30)

    assert round_trip(Colour, Colour.BLUE) is Colour.BLUE
    assert round_trip(WithNone, WithNone.NOTHING) is WithNone.NOTHING
    assert round_trip(Priority, Priority.HIGH) is Priority.HIGH
    assert round_trip(int, 10**1000) == 10**1000
    assert round_trip(str, "\u2028 ü 😀 '\\\"") == "\u2028 ü 😀 '\\\""


@pytest.mark.parametrize(
    "moment",
    [
        # 02:30 does not exist on 2024-03-31 in Paris (clocks jump 02:00 -> 03:00)...
        datetime.datetime(2024, 3, 31, 2, 30, tzinfo=PARIS),
        datetime.datetime(2024, 3, 31, 2, 30, fold=1, tzinfo=PARIS),
        # ... and exists twice on 2024-10-27.
        datetime.datetime(2024, 10, 27, 2, 30, tzinfo=PARIS),
        datetime.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=PARIS),
        # At the ends of the datetime range, where a conversion to UTC overflows.
        datetime.datetime(1, 1, 1, tzinfo=zoneinfo.ZoneInfo("Asia/Tokyo")),
        datetime.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=NEW_YORK),
    ],
    ids=["gap", "gap-fold", "repeated", "repeated-fold", "min", "max"],
)
def test_zoned_datetimes_keep_wall_time_and_offset_across_dst_and_range_ends(moment):
    decoded = round_trip(datetime.datetime, moment)
    assert (decoded.replace(tzinfo=None), decoded.utcoffset(), decoded.tzinfo) == (
        moment.replace(tzinfo=None),
        moment.utcoffset(),
        moment.tzinfo,
    )


def test_other_tzinfo_classes_keep_their_offset():
    class Plus3(datetime.tzinfo):  # a tzinfo that is neither timezone nor ZoneInfo (like pytz)
        def utcoffset(self, dt):
            return datetime.timedelta(hours=3)

        def dst(self, dt):
            return datetime.timedelta(0)

    moment = datetime.datetime(9999, 12, 31, 23, tzinfo=Plus3())
    decoded = round_trip(datetime.datetime, moment)
    assert decoded == moment
    assert decoded.utcoffset() == datetime.timedelta(hours=3)
    assert decoded.replace(tzinfo=None) == moment.replace(tzinfo=None)


@settings(max_examples=60, deadline=None)
@given(
    st.builds(
        Everything,
        text=TEXT,
        number=st.integers(),
        ratio=st.floats(),
        flag=st.booleans(),
        price=DECIMALS,
        day=st.dates(),
        moment=DATETIMES,
        clock=TIMES,
        ident=st.uuids(),
        colour=st.sampled_from(Colour),
        numbers=st.lists(st.integers()),
        pair=st.tuples(TEXT, st.integers()),
        names=st.sets(TEXT),
        prices=st.dictionaries(TEXT, DECIMALS),
        calendar=st.dictionaries(st.integers(), st.dates()),
        maybe=st.none() | st.integers(),
        anything=JSON_VALUES,
        extra=st.lists(TEXT),
    )
)
def test_a_channel_with_many_fields_round_trips(message):
    decoded = Everything.deserialize(message.serialize())
    assert same(decoded, message.signature)
    rebuilt = Everything.build_from_payload(message.serialize(), [])
    assert same(rebuilt.signature, message.signature)


# --- through PostgreSQL's jsonb ------------------------------------------------------------------


def through_jsonb(payload: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::jsonb::text", [payload])
        (text,) = cursor.fetchone()
    return text


JSONB_HAZARDS = [
    (float, 1e308),
    (float, 1.7976931348623157e308),
    (float, -1.7976931348623157e308),
    (float, 5e-324),  # the smallest subnormal
    (float, 1e-300),
    (float, 2.2250738585072014e-308),
    (float, 1e16),
    (float, 0.1),
    (float, 1 / 3),
    (float, -0.0),
    (float, math.nan),
    (float, math.inf),
    (list[float], [1e22, 1e-7, 123456789.123456789, -0.0]),
    (dict[float, float], {1e300: 1e-300, 0.5: 2.5}),
    (Decimal, Decimal("1.10")),
    (Decimal, Decimal("1E+400")),
    (Decimal, Decimal("-0.000")),
    (Decimal, Decimal("123456789012345678901234567890.123456789012345678901234567890")),
    (Decimal, Decimal("NaN")),
    (int, 10**100),
    (int, -(2**63)),
    (str, "\u2028\u2029 ü 😀 \\ \" ' \x01 \x7f"),
    (dict[str, int], {"b": 1, "a": 2, "": 3}),  # jsonb reorders keys
    (dict[int, datetime.date], {10: datetime.date(2024, 1, 1), 9: datetime.date.max}),
    (datetime.datetime, datetime.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=PARIS)),
    (datetime.time, datetime.time(23, 59, 59, 999999, tzinfo=UTC)),
    (Any, {"small": 1e-300, "int": 10**40, "big": 2.5e15, "list": [1.5, "x", None, True]}),
]


@pytest.mark.django_db
@pytest.mark.parametrize("tp, value", JSONB_HAZARDS, ids=short)
def test_serialized_payloads_survive_jsonb(tp, value):
    cls = channel_for(tp)
    stored = through_jsonb(cls(value=value).serialize())
    assert same(cls.deserialize(stored)["value"], value)


@pytest.mark.django_db
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(typed_values())
def test_typed_fields_survive_jsonb(typed_value):
    tp, value = typed_value
    cls = channel_for(tp)
    stored = through_jsonb(cls(value=value).serialize())
    assert same(cls.deserialize(stored)["value"], value)


# --- refused when the channel is defined --------------------------------------------------------


class NotSendable:
    pass


class TupleValued(enum.Enum):
    POINT = (1, 2)


class NanValued(enum.Enum):
    NOTHING = math.nan


class DecimalValued(enum.Enum):
    PRICE = Decimal("1.5")


@pytest.mark.parametrize(
    "tp, reason",
    [
        (bytes, "cannot be sent"),
        (NotSendable, "cannot be sent"),
        (Union[int, str], "Union"),  # noqa: UP007
        (int | str, "Union"),
        (Optional[int | str], "Union"),  # noqa: UP045
        (set, "cannot be sent"),
        (tuple, "cannot be sent"),
        (frozenset, "cannot be sent"),
        (typing.Tuple, "tuple needs item types"),  # noqa: UP006
        (typing.Set, "set needs one item type"),  # noqa: UP006
        (typing.FrozenSet, "frozenset needs one item type"),  # noqa: UP006
        (TupleValued, "TupleValued.POINT"),
        (NanValued, "NanValued.NOTHING"),
        (DecimalValued, "DecimalValued.PRICE"),
        (Optional[WithNone], "ambiguous"),  # noqa: UP045
        (dict[bytes, int], "cannot be sent"),
        (dict[str, bytes], "cannot be sent"),
        (list[NotSendable], "cannot be sent"),
        (dict[str, list[Optional[bytes]]], "cannot be sent"),  # noqa: UP045
        (datetime.timedelta, "cannot be sent"),
        (typing.Sequence[int], "cannot be sent"),  # noqa: UP006
    ],
    ids=short,
)
def test_a_field_type_that_cannot_round_trip_is_refused_at_class_definition(tp, reason):
    with pytest.raises(InvalidChannel) as raised:

        @dataclasses.dataclass
        class Refused(Channel):
            fine: int
            field: tp

    assert "Refused.field" in str(raised.value)
    assert reason in str(raised.value)


def test_bare_json_containers_and_any_are_accepted():
    @dataclasses.dataclass
    class Loose(Channel):
        items: list
        mapping: dict
        legacy_items: typing.List  # noqa: UP006
        legacy_mapping: typing.Dict  # noqa: UP006
        anything: Any
        obj: object
        empty: tuple[()]

    message = Loose(
        items=[1, "a", None, [2.5]],
        mapping={"a": {"b": [True]}},
        legacy_items=[],
        legacy_mapping={},
        anything="x",
        obj=3,
        empty=(),
    )
    assert Loose.deserialize(message.serialize()) == message.signature


# --- refused when a message is sent -------------------------------------------------------------


@dataclasses.dataclass
class Strict(Channel):
    number: int = 0
    ratio: float = 0.0
    text: str = ""
    day: datetime.date = datetime.date(2024, 1, 1)
    moment: datetime.datetime = datetime.datetime(2024, 1, 1)
    clock: datetime.time = datetime.time(0)
    price: Decimal = Decimal(0)
    ident: uuid.UUID = uuid.UUID(int=0)
    colour: Colour = Colour.RED
    names: list[str] = dataclasses.field(default_factory=list)
    labels: dict[str, int] = dataclasses.field(default_factory=dict)
    anything: Any = None
    loose: dict[Any, int] = dataclasses.field(default_factory=dict)


REFUSED_VALUES = [
    ("number", True, "Strict.number"),
    ("number", 1.0, "Strict.number"),
    ("number", Decimal(1), "Strict.number"),
    ("number", "1.5", "Strict.number"),
    ("number", "one", "Strict.number"),
    ("number", 10**5000, "Strict.number"),  # longer than Python writes as text
    ("ratio", True, "Strict.ratio"),
    ("ratio", "1.5", "Strict.ratio"),
    ("ratio", 10**400, "Strict.ratio"),  # no float that large
    ("text", b"bytes", "Strict.text"),
    ("text", "nul \x00 inside", "Strict.text"),
    ("text", "lone \ud800 surrogate", "Strict.text"),
    ("day", datetime.datetime(2024, 1, 1), "Strict.day"),
    ("day", "2024-01-01", "Strict.day"),
    ("moment", datetime.date(2024, 1, 1), "Strict.moment"),
    ("moment", "2024-01-01T00:00:00", "Strict.moment"),
    ("clock", datetime.datetime(2024, 1, 1), "Strict.clock"),
    ("clock", datetime.time(12, tzinfo=PARIS), "Strict.clock"),  # no fixed offset
    ("price", 1.5, "Strict.price"),
    ("price", "1.5", "Strict.price"),
    ("ident", str(uuid.UUID(int=1)), "Strict.ident"),
    ("colour", "red", "Strict.colour"),
    ("colour", Shade.LIGHT, "Strict.colour"),
    ("names", "abc", "Strict.names"),
    ("names", ["ok", "nul\x00"], "Strict.names[1]"),
    ("labels", {"a\x00": 1}, "Strict.labels key"),
    ("anything", math.nan, "Strict.anything"),
    ("anything", math.inf, "Strict.anything"),
    ("anything", [1, [math.nan]], "Strict.anything[1][0]"),
    ("anything", Decimal("1.5"), "Strict.anything"),
    ("anything", datetime.date(2024, 1, 1), "Strict.anything"),
    ("anything", {1, 2}, "Strict.anything"),
    ("anything", object(), "Strict.anything"),
    ("anything", b"bytes", "Strict.anything"),
    ("anything", {1: "int key"}, "Strict.anything"),
    ("anything", {"k": "\x00"}, "Strict.anything['k']"),
    ("text", 10**5000, "Strict.text"),
    ("anything", "\udfff", "Strict.anything"),
    ("loose", {(1, 2): 3}, "Strict.loose key"),
]


# Values django-pgpubsub 1.x converted to the field's type (its listeners got ``str(value)`` or
# ``int(value)``): converted the same way, so producers keep working after the upgrade.
CONVERTED_VALUES = [
    ("number", "1", 1),
    ("number", "-42", -42),
    ("text", 1, "1"),
    ("text", 2.5, "2.5"),
    ("text", Decimal("1.50"), "1.50"),
    ("text", uuid.UUID(int=1), str(uuid.UUID(int=1))),
    ("names", ["ok", 2], ["ok", "2"]),
    ("labels", {1: 1}, {"1": 1}),
    ("labels", {"a": "1"}, {"a": 1}),
]


@pytest.mark.parametrize("field, value, expected", CONVERTED_VALUES, ids=short)
def test_values_1_x_converted_are_converted_alike(field, value, expected):
    received_value = getattr(
        Strict.build_from_payload(Strict(**{field: value}).serialize(), []), field
    )
    assert received_value == expected
    assert type(received_value) is type(expected)


@pytest.mark.parametrize(
    "stored, expected",
    [({"text": 7}, "7"), ({"number": "5"}, 5), ({"text": 1.5}, "1.5")],
    ids=str,
)
def test_rows_stored_by_1_x_with_unconverted_values_are_read(stored, expected):
    (field,) = stored
    assert getattr(Strict.build_from_payload({"kwargs": stored}, []), field) == expected


@pytest.mark.parametrize("field, value, where", REFUSED_VALUES, ids=short)
def test_a_value_that_does_not_fit_its_field_is_refused_by_serialize(field, value, where):
    with pytest.raises(InvalidPayload) as raised:
        Strict(**{field: value}).serialize()
    assert str(raised.value).startswith(where + ":")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "field, value, where",
    [
        ("number", True, "Strict.number"),
        ("text", "nul \x00 inside", "Strict.text"),
        ("text", "lone \ud800 surrogate", "Strict.text"),
        ("anything", math.nan, "Strict.anything"),
        ("anything", object(), "Strict.anything"),
        ("moment", datetime.date(2024, 1, 1), "Strict.moment"),
    ],
    ids=short,
)
def test_a_value_that_does_not_fit_its_field_is_refused_by_notify(field, value, where):
    with pytest.raises(InvalidPayload, match=rf"^{re.escape(where)}:"):
        pgpubsub.notify(Strict, **{field: value})


def test_the_defaults_of_the_strict_channel_are_themselves_sendable():
    """Guards the refusal tests above: only the one bad field makes them fail."""
    message = Strict()
    assert same(Strict.deserialize(message.serialize()), message.signature)


# --- payloads written by django-pgpubsub 1.3.1 ---------------------------------------------------


@dataclasses.dataclass
class Legacy(Channel):
    price: Decimal
    day: datetime.date
    moment: datetime.datetime
    naive: datetime.datetime
    clock: datetime.time
    ident: uuid.UUID
    ratio: float
    count: int
    shade: Shade
    priority: Priority
    calendar: dict[int, datetime.date]
    ratios: dict[float, str]
    flags: dict[bool, int]
    optional_keys: dict[Optional[int], str]  # noqa: UP045
    names: set[str]
    pair: tuple[str, int]
    stamps: list[datetime.datetime]
    maybe: Optional[Decimal] = None  # noqa: UP045


def legacy_payload(**kwargs) -> str:
    """What django-pgpubsub 1.3.1 stored: json.dumps({"kwargs": ...}, cls=DjangoJSONEncoder)."""
    return json.dumps({"kwargs": kwargs}, cls=DjangoJSONEncoder)


LEGACY_VALUES = dict(
    price=Decimal("12.50"),
    day=datetime.date(2024, 2, 29),
    moment=datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
    naive=datetime.datetime(2024, 5, 6, 7, 8, 9, 654321),
    clock=datetime.time(7, 8, 9, 123456),
    ident=uuid.UUID("12345678-1234-5678-1234-567812345678"),
    ratio=0.1,
    count=42,
    shade=Shade.DARK,
    priority=Priority.HIGH,
    calendar={1: datetime.date(2024, 1, 1), 22: datetime.date(2024, 12, 31)},
    ratios={1.5: "one and a half", -2.0: "minus two"},
    flags={True: 1, False: 0},
    optional_keys={None: "none", 3: "three"},
    names=["b", "a"],  # 1.3.1 sent sets and tuples as JSON arrays
    pair=["x", 1],
    stamps=[datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=-5)))],
    maybe=Decimal("0.001"),
)

LEGACY_DECODED = dict(
    LEGACY_VALUES,
    # Django's encoder keeps milliseconds only, and writes UTC as "Z".
    moment=datetime.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC),
    naive=datetime.datetime(2024, 5, 6, 7, 8, 9, 654000),
    clock=datetime.time(7, 8, 9, 123000),
    names={"a", "b"},
    pair=("x", 1),
)


def test_the_legacy_payload_looks_like_django_pgpubsub_wrote_it():
    kwargs = json.loads(legacy_payload(**LEGACY_VALUES))["kwargs"]
    assert kwargs["price"] == "12.50"
    assert kwargs["moment"] == "2024-05-06T07:08:09.123Z"
    assert kwargs["calendar"] == {"1": "2024-01-01", "22": "2024-12-31"}
    assert kwargs["flags"] == {"true": 1, "false": 0}
    assert kwargs["optional_keys"] == {"null": "none", "3": "three"}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda text: text,
        json.loads,  # as read from a jsonb column
        json.dumps,  # a JSON string containing the JSON text (stored twice encoded)
        lambda text: json.dumps(json.dumps(text)),
        lambda text: text.encode(),
    ],
    ids=["text", "parsed", "double-encoded", "triple-encoded", "bytes"],
)
def test_payloads_written_by_django_pgpubsub_1_3_1_decode_to_the_declared_types(wrap):
    decoded = Legacy.deserialize(wrap(legacy_payload(**LEGACY_VALUES)))
    assert same(decoded, LEGACY_DECODED)


@pytest.mark.django_db
def test_legacy_payloads_decode_after_a_trip_through_jsonb():
    stored = through_jsonb(legacy_payload(**LEGACY_VALUES))
    assert same(Legacy.deserialize(stored), LEGACY_DECODED)
    double = through_jsonb(json.dumps(legacy_payload(**LEGACY_VALUES)))
    assert same(Legacy.deserialize(double), LEGACY_DECODED)


def test_legacy_numbers_written_as_text_or_json_numbers_decode():
    decoded = Legacy.deserialize(
        legacy_payload(**dict(LEGACY_VALUES, ratio=3, count="7", price=2, maybe=None))
    )
    assert same(decoded["ratio"], 3.0)
    assert same(decoded["count"], 7)
    assert same(decoded["price"], Decimal(2))
    assert decoded["maybe"] is None


@pytest.mark.parametrize(
    "payload",
    ['{"args": []}', "[1, 2]", '{"kwargs": "not an object"}', "null", '"[]"'],
)
def test_a_payload_without_kwargs_is_refused_clearly(payload):
    with pytest.raises(InvalidPayload, match="kwargs"):
        Legacy.deserialize(payload)


@pytest.mark.parametrize("payload", ["", "not json", '"just text"', '{"kwargs": {'])
def test_a_payload_that_is_not_json_is_refused(payload):
    with pytest.raises(ValueError):
        Legacy.deserialize(payload)


@pytest.mark.parametrize(
    "field, raw",
    [
        ("count", "seven"),
        ("count", 1.5),
        ("count", True),
        ("day", "yesterday"),
        ("moment", 12),
        ("ident", "not-a-uuid"),
        ("shade", "purple"),
        ("ratio", "fast"),
        ("calendar", [1, 2]),
        ("pair", ["x"]),
    ],
)
def test_a_payload_value_of_the_wrong_shape_is_refused_naming_the_field(field, raw):
    payload = json.loads(legacy_payload(**LEGACY_VALUES))
    payload["kwargs"][field] = raw
    with pytest.raises(InvalidPayload, match=rf"Legacy\.{field}"):
        Legacy.deserialize(json.dumps(payload))


@dataclasses.dataclass
class OldStyleTuple(Channel):
    ids: tuple[int]  # django-pgpubsub 1.x read this as a tuple of any length


@pytest.mark.parametrize("ids", [(), (1,), (1, 2, 3)], ids=str)
def test_a_one_argument_tuple_field_takes_any_length_as_in_1_x(ids):
    message = OldStyleTuple.build_from_payload(OldStyleTuple(ids=ids).serialize(), [])
    assert message.ids == ids and isinstance(message.ids, tuple)

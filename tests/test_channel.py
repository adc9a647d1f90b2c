"""Channel naming, the registry of listeners, locating channels, building messages from payloads,
and the checks listener decorators make before they register anything."""

import dataclasses
import datetime
import hashlib
import itertools
import json
import re
import uuid
from decimal import Decimal

import pgtrigger
import pytest
from django.test import override_settings

import pgpubsub
from pgpubsub.channel import (
    BaseChannel,
    Channel,
    ChannelNotFound,
    TriggerChannel,
    _by_listen_name,
    _trigger_operations,
    locate_channel,
    registry,
    select_channels,
)
from pgpubsub.exceptions import InvalidChannel, ListenerSignatureError
from pgpubsub.listeners import check_signature
from tests.testapp import channels, listeners
from tests.testapp.models import Post


@dataclasses.dataclass
class Greeting(Channel):
    """A throwaway channel: nothing in the test app listens to it."""

    name: str
    times: int = 1


@dataclasses.dataclass
class LoudGreeting(Greeting):
    volume: int = 11


@dataclasses.dataclass
class ThrowawayPostTrigger(TriggerChannel):
    model = Post


@pytest.fixture(autouse=True)
def restore_registry():
    """Undo whatever a test registers, so other test modules see the test app's listeners only."""
    callbacks = {cls: list(registered) for cls, registered in registry.items()}
    by_name = dict(_by_listen_name)
    operations = dict(_trigger_operations)
    triggers = list(pgtrigger.registered())
    yield
    for cls in list(registry):
        if cls not in callbacks:
            del registry[cls]
    for cls, registered in callbacks.items():
        registry[cls][:] = registered
    _by_listen_name.clear()
    _by_listen_name.update(by_name)
    _trigger_operations.clear()
    _trigger_operations.update(operations)
    assert pgtrigger.registered() == triggers, "a test left a pgtrigger trigger registered"


def sha1_name(dotted: str) -> str:
    return "pgpubsub_" + hashlib.sha1(dotted.encode("utf-8")).hexdigest()[:5]


# --- naming --------------------------------------------------------------------------------------


def test_name_is_the_dotted_path_of_the_class():
    assert channels.Message.name() == "tests.testapp.channels.Message"
    assert channels.AuthorTrigger.name() == "tests.testapp.channels.AuthorTrigger"
    assert Greeting.name() == f"{__name__}.Greeting"
    assert LoudGreeting.name() == f"{__name__}.LoudGreeting"


def test_listen_safe_name_is_pgpubsub_and_five_hex_digits_of_the_sha1_of_the_name():
    # sha1(b"tests.testapp.channels.Message") = b9bdb...: the name django-pgpubsub 1.3.1 LISTENs on.
    assert channels.Message.listen_safe_name() == "pgpubsub_b9bdb"
    for cls in [channels.Message, channels.Job, channels.AuthorTrigger, Greeting, LoudGreeting]:
        assert cls.listen_safe_name() == sha1_name(cls.name())
        assert re.fullmatch(r"pgpubsub_[0-9a-f]{5}", cls.listen_safe_name())


def test_a_subclass_gets_its_own_listen_name_even_after_its_parent_computed_one():
    parent = Greeting.listen_safe_name()

    @dataclasses.dataclass
    class Shouted(Greeting):
        pass

    assert Shouted.listen_safe_name() == sha1_name(f"{__name__}.Shouted") != parent
    assert Greeting.listen_safe_name() == parent


def test_registered_channels_of_the_test_app_have_distinct_listen_names():
    names = [cls.listen_safe_name() for cls in registry]
    assert len(set(names)) == len(names)


# --- registry, get(), register() -----------------------------------------------------------------


def test_registry_maps_each_channel_class_to_its_callbacks_in_order():
    assert registry[channels.Message] == [
        listeners.record_message,
        listeners.record_message_again,
    ]
    assert channels.Message in registry
    assert dict(registry.items())[channels.Job] == [listeners.run_job]
    assert Greeting not in registry  # defining a channel registers nothing


def test_get_returns_the_registered_class_and_its_callbacks():
    found = BaseChannel.get(channels.Message.listen_safe_name())
    assert found == (channels.Message, [listeners.record_message, listeners.record_message_again])
    assert Channel.get(channels.AuthorTrigger.listen_safe_name()) == (
        channels.AuthorTrigger,
        [listeners.write_first_post],
    )


def test_get_returns_none_for_an_unknown_or_unregistered_name():
    assert BaseChannel.get("pgpubsub_zzzzz") is None
    assert BaseChannel.get("") is None
    assert BaseChannel.get(Greeting.listen_safe_name()) is None
    assert BaseChannel.get(Greeting.name()) is None  # get() takes the LISTEN name


def test_register_keeps_several_callbacks_in_order_without_duplicates():
    def first(name, times):
        pass

    def second(name, times):
        pass

    Greeting.register(first)
    Greeting.register(second)
    Greeting.register(first)
    assert registry[Greeting] == [first, second]
    assert BaseChannel.get(Greeting.listen_safe_name()) == (Greeting, [first, second])


def test_a_subclass_and_its_parent_are_registered_separately():
    def greet(name, times):
        pass

    def shout(name, times, volume):
        pass

    Greeting.register(greet)
    LoudGreeting.register(shout)
    assert BaseChannel.get(Greeting.listen_safe_name()) == (Greeting, [greet])
    assert BaseChannel.get(LoudGreeting.listen_safe_name()) == (LoudGreeting, [shout])


def test_select_channels_picks_registered_channels_and_their_subclasses():
    def greet(**kwargs):
        pass

    Greeting.register(greet)
    LoudGreeting.register(greet)
    assert select_channels([Greeting]) == {Greeting: [greet], LoudGreeting: [greet]}
    assert select_channels([f"{__name__}.LoudGreeting"]) == {LoudGreeting: [greet]}
    everything = select_channels()
    assert everything[Greeting] == [greet]
    assert everything[channels.Message] == registry[channels.Message]
    assert ThrowawayPostTrigger not in everything


# --- locate_channel --------------------------------------------------------------------------------


def test_locate_channel_accepts_a_class_or_its_dotted_path():
    assert locate_channel(channels.Message) is channels.Message
    assert locate_channel(Greeting) is Greeting
    assert locate_channel("tests.testapp.channels.Message") is channels.Message
    assert locate_channel("tests.testapp.channels.AuthorTrigger") is channels.AuthorTrigger
    assert locate_channel(f"{__name__}.LoudGreeting") is LoudGreeting


@pytest.mark.parametrize(
    "path",
    [
        "tests.testapp.channels.NoSuchChannel",
        "no_such_module.Channel",
        "tests.testapp.no_such_module.Message",
        "",
    ],
)
def test_locate_channel_refuses_an_unknown_path(path):
    with pytest.raises(ChannelNotFound) as raised:
        locate_channel(path)
    assert "Channel not found" in str(raised.value)


@pytest.mark.parametrize(
    "thing",
    [
        "json.dumps",  # a path to something that is not a channel
        "tests.testapp.models.Post",
        "tests.testapp.channels",  # a module
        json,
        dict,
        Post,
        42,
        None,
        channels.Message(key="an instance, not the class"),
    ],
    ids=repr,
)
def test_locate_channel_refuses_what_is_not_a_channel_class(thing):
    with pytest.raises(ChannelNotFound) as raised:
        locate_channel(thing)
    assert "Channel not found" in str(raised.value)


def test_channel_not_found_has_a_default_message():
    assert str(ChannelNotFound()) == "Channel not found!"


# --- building messages from payloads -----------------------------------------------------------------


def test_build_from_payload_returns_an_instance_carrying_the_callbacks():
    calls = []

    def first(**kwargs):
        calls.append(("first", kwargs))

    def second(name, times):
        calls.append(("second", {"name": name, "times": times}))

    given = [first, second]
    message = Greeting.build_from_payload(Greeting(name="ada", times=3).serialize(), given)
    given.append(print)  # the instance keeps its own list
    assert isinstance(message, Greeting)
    assert (message.name, message.times) == ("ada", 3)
    assert message.callbacks == [first, second]
    assert message.signature == {"name": "ada", "times": 3}

    message.execute_callbacks()
    assert calls == [
        ("first", {"name": "ada", "times": 3}),
        ("second", {"name": "ada", "times": 3}),
    ]


@pytest.mark.parametrize(
    "payload",
    [
        '{"kwargs": {"name": "ada", "times": 3}}',
        {"kwargs": {"name": "ada", "times": 3}},  # as read from a jsonb column
        json.dumps('{"kwargs": {"name": "ada", "times": 3}}'),  # stored as a JSON string
        '{"kwargs": {"name": "ada", "times": 3, "removed_field": [1, 2]}}',  # an older producer
    ],
    ids=["text", "parsed", "double-encoded", "extra-field"],
)
def test_build_from_payload_reads_every_stored_payload_form(payload):
    message = Greeting.build_from_payload(payload, [])
    assert message == Greeting(name="ada", times=3)
    assert message.callbacks == []


def test_a_field_missing_from_an_older_payload_takes_its_default():
    message = LoudGreeting.build_from_payload('{"kwargs": {"name": "ada"}}', [])
    assert (message.name, message.times, message.volume) == ("ada", 1, 11)


def test_callbacks_receive_the_declared_types():
    received = []
    sent = dict(
        text="t",
        number=1,
        ratio=0.5,
        flag=True,
        price=Decimal("9.90"),
        day=datetime.date(2024, 2, 29),
        moment=datetime.datetime(2024, 2, 29, 12, tzinfo=datetime.timezone.utc),
        clock=datetime.time(12, 30),
        ident=uuid.UUID(int=7),
        colour=channels.Colour.BLUE,
        numbers=[1, 2],
        pair=("a", 1),
        names={"x", "y"},
        prices={"a": Decimal("1.10")},
        calendar={3: datetime.date(2024, 1, 3)},
        maybe=None,
        anything={"k": [1, None]},
        extra=["e"],
    )
    payload = channels.Everything(**sent).serialize()
    message = channels.Everything.build_from_payload(payload, [lambda **kw: received.append(kw)])
    message.execute_callbacks()
    (kwargs,) = received
    assert kwargs == sent
    assert {name: type(value) for name, value in kwargs.items()} == {
        name: type(value) for name, value in sent.items()
    }
    assert str(kwargs["price"]) == "9.90"


# --- listener signatures, checked when decorating ---------------------------------------------------


def missing_times(name):
    pass


def extra_required(name, times, weather):
    pass


def positional_only(name, /, times):
    pass


def only_args(*args):
    pass


@pytest.mark.parametrize(
    "callback, detail",
    [
        (missing_times, "['times']"),
        (extra_required, "'weather'"),
        (positional_only, "positional-only parameter 'name'"),
        (only_args, "['name', 'times']"),
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_a_listener_that_cannot_take_the_channel_fields_is_refused(callback, detail):
    with pytest.raises(ListenerSignatureError) as raised:
        pgpubsub.listener(Greeting)(callback)
    message = str(raised.value)
    assert callback.__name__ in message
    assert Greeting.name() in message
    assert detail in message
    assert Greeting not in registry
    assert BaseChannel.get(Greeting.listen_safe_name()) is None


def test_listeners_with_kwargs_defaults_or_keyword_only_parameters_are_accepted():
    def everything(**kwargs):
        pass

    def some_and_rest(name, **kwargs):
        pass

    def with_defaults(name, times=2, mood="fine"):
        pass

    def keyword_only(*, name, times):
        pass

    def with_star_args(name, times, *args):
        pass

    def positional_only_with_default(unused=None, /, name="", times=0):
        pass

    class CallableListener:
        def __call__(self, name, times):
            pass

    accepted = [
        everything,
        some_and_rest,
        with_defaults,
        keyword_only,
        with_star_args,
        positional_only_with_default,
        CallableListener(),
    ]
    for callback in accepted:
        assert pgpubsub.listener(Greeting)(callback) is callback  # the function itself is kept
    assert registry[Greeting] == accepted


def test_listener_accepts_the_dotted_path_of_the_channel():
    def greet(name, times):
        pass

    pgpubsub.listener(f"{__name__}.Greeting")(greet)
    assert BaseChannel.get(Greeting.listen_safe_name()) == (Greeting, [greet])


def test_listener_of_an_unknown_channel_is_refused_before_decorating():
    with pytest.raises(ChannelNotFound):
        pgpubsub.listener(f"{__name__}.NoSuchChannel")


def test_a_subclass_listener_must_take_the_inherited_fields_too():
    def greet(name, times):
        pass

    with pytest.raises(ListenerSignatureError, match=r"\['volume'\]"):
        pgpubsub.listener(LoudGreeting)(greet)


TRIGGER_DECORATORS = [
    pgpubsub.pre_save_listener,
    pgpubsub.post_save_listener,
    pgpubsub.pre_insert_listener,
    pgpubsub.post_insert_listener,
    pgpubsub.pre_update_listener,
    pgpubsub.post_update_listener,
    pgpubsub.pre_delete_listener,
    pgpubsub.post_delete_listener,
]


def only_new(new):
    pass


def old_new_and_more(old, new, request):
    pass


def instance_only(instance):
    pass


@pytest.mark.parametrize("decorator", TRIGGER_DECORATORS, ids=lambda d: d.__name__)
@pytest.mark.parametrize(
    "callback, detail",
    [(only_new, "['old']"), (old_new_and_more, "'request'"), (instance_only, "'instance'")],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_a_trigger_listener_with_a_wrong_signature_is_refused_before_any_trigger_is_installed(
    decorator, callback, detail
):
    triggers = list(pgtrigger.registered())
    with pytest.raises(ListenerSignatureError) as raised:
        decorator(ThrowawayPostTrigger)(callback)
    message = str(raised.value)
    assert callback.__name__ in message
    assert ThrowawayPostTrigger.name() in message
    assert detail in message
    assert pgtrigger.registered() == triggers
    assert ThrowawayPostTrigger not in registry
    assert not any(cls is ThrowawayPostTrigger for cls, _ in _trigger_operations)


def test_trigger_listener_signatures_follow_the_context_setting():
    def old_new(old, new):
        pass

    def with_context(old, new, context):
        pass

    def with_optional_context(old, new, context=None):
        pass

    def anything(**kwargs):
        pass

    check_signature(ThrowawayPostTrigger, old_new)
    check_signature(ThrowawayPostTrigger, with_optional_context)
    check_signature(ThrowawayPostTrigger, anything)
    with pytest.raises(ListenerSignatureError, match="'context'"):
        check_signature(ThrowawayPostTrigger, with_context)

    with override_settings(PGPUBSUB_PASS_CONTEXT_TO_LISTENERS=True):
        check_signature(ThrowawayPostTrigger, with_context)
        check_signature(ThrowawayPostTrigger, with_optional_context)
        check_signature(ThrowawayPostTrigger, anything)
        with pytest.raises(ListenerSignatureError, match=r"\['context'\]"):
            check_signature(ThrowawayPostTrigger, old_new)


@pytest.mark.parametrize(
    "annotation", [Post, "Post", "type[Post]"], ids=["class", "string", "type"]
)
def test_a_trigger_channel_may_annotate_its_model(annotation):
    """``model: Post`` (which django-pgpubsub 1.x accepted) means ``model = Post``; it used to
    fail at definition (a dataclass field without a default after ``context``)."""
    namespace = {"__annotations__": {"model": annotation}, "__module__": __name__}
    Annotated = dataclasses.dataclass(type("Annotated", (TriggerChannel,), namespace))

    assert Annotated.model is Post
    assert [field.name for field in dataclasses.fields(Annotated)] == [
        "old",
        "new",
        "context",
        "when",
    ]
    row = {"id": 7, "author_id": None, "content": "hi", "date": None, "read_count": 0}
    payload = {"app": "testapp", "model": "Post", "old": None, "new": row, "context": {}}
    message = Annotated.build_from_payload(json.dumps(payload), [])
    assert isinstance(message.new, Post) and message.new.pk == 7
    assert message.old is None


def test_a_trigger_channel_annotating_an_unknown_model_says_what_to_write():
    namespace = {"__annotations__": {"model": "NoSuchModel"}, "__module__": __name__}
    with pytest.raises(InvalidChannel, match="model = YourModel"):
        type("Unknown", (TriggerChannel,), namespace)


def test_a_trigger_channel_without_a_model_is_refused():
    @dataclasses.dataclass
    class Modelless(TriggerChannel):
        pass

    with pytest.raises(InvalidChannel, match="model"):
        pgpubsub.post_save_listener(Modelless)
    assert Modelless not in registry


# --- LISTEN name collisions ------------------------------------------------------------------------


def colliding_names() -> tuple[str, str]:
    """Two class names in this module whose dotted paths share the first 5 sha1 hex digits."""
    seen: dict[str, str] = {}
    for index in itertools.count():
        name = f"Colliding{index}"
        prefix = sha1_name(f"{__name__}.{name}")
        if prefix in seen:
            return seen[prefix], name
        seen[prefix] = name
    raise AssertionError("unreachable")


def make_channel(name: str) -> type[Channel]:
    return dataclasses.dataclass(type(name, (Channel,), {"__module__": __name__}))


def test_two_channels_sharing_a_listen_name_cannot_both_be_registered():
    first_name, second_name = colliding_names()
    first, second = make_channel(first_name), make_channel(second_name)
    assert first.listen_safe_name() == second.listen_safe_name()
    assert first.name() != second.name()

    def on_first():
        pass

    def on_second():
        pass

    pgpubsub.listener(first)(on_first)
    with pytest.raises(InvalidChannel) as raised:
        pgpubsub.listener(second)(on_second)
    message = str(raised.value)
    assert first.name() in message
    assert second.name() in message
    assert first.listen_safe_name() in message

    assert BaseChannel.get(first.listen_safe_name()) == (first, [on_first])
    assert second not in registry


def test_a_channel_class_defined_again_under_the_same_name_replaces_the_old_one():
    """What happens when a module is reloaded (runserver, notebooks): no collision, the newest
    class wins and keeps the listeners registered so far."""
    old, new = make_channel("Reloaded"), make_channel("Reloaded")
    assert old is not new

    def before():
        pass

    def after():
        pass

    pgpubsub.listener(old)(before)
    pgpubsub.listener(new)(after)
    assert BaseChannel.get(new.listen_safe_name()) == (new, [before, after])
    assert old not in registry


# --- channel options, checked when the class is defined -----------------------------------------


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "1"])
def test_max_concurrency_must_be_a_positive_int(value):
    """Refused where the class is defined (it was refused when a Runtime started)."""
    with pytest.raises(ValueError, match="Limited.max_concurrency must be a positive int"):

        class Limited(channels.Message):
            max_concurrency = value


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (1, TypeError, r"Elsewhere.database must be a database alias \(a str\) or None, not 1"),
        (["other"], TypeError, r"Elsewhere.database must be a database alias \(a str\)"),
        ("", ValueError, "Elsewhere.database must be a database alias or None, not ''"),
    ],
)
def test_database_must_be_an_alias(value, error, message):
    """Whether DATABASES has the alias is told by `manage.py check` (pgpubsub.E014): the
    settings may not be loaded where a channel is defined."""
    with pytest.raises(error, match=message):

        class Elsewhere(channels.Message):
            database = value


def test_good_channel_options_are_accepted():
    @dataclasses.dataclass
    class Tuned(channels.Job):
        max_concurrency = 1
        database = "side"
        max_attempts = 2
        retry_delay = 1

    assert (Tuned.max_concurrency, Tuned.database, Tuned.max_attempts) == (1, "side", 2)


@pytest.mark.parametrize("payload", ["not json", "{'single': 'quotes'}", '"still not json'])
def test_a_payload_that_is_not_json_is_an_invalid_payload(payload):
    from pgpubsub.exceptions import InvalidPayload

    with pytest.raises(InvalidPayload, match="not JSON"):
        channels.Message.build_from_payload(payload, [])


@dataclasses.dataclass
class Derived(Channel):
    """A channel with a constructor-only argument and a field computed from the others."""

    first: str
    last: str
    shout: dataclasses.InitVar[bool] = False
    full: str = dataclasses.field(init=False, default="")

    def __post_init__(self, shout: bool) -> None:  # does not call super().__post_init__()
        self.full = f"{self.first} {self.last}"
        if shout:
            self.full = self.full.upper()


def test_init_var_and_init_false_fields_are_not_sent_but_rebuilt():
    payload = Derived(first="Ada", last="Lovelace", shout=True).serialize()
    assert json.loads(payload) == {"kwargs": {"first": "Ada", "last": "Lovelace"}}
    calls = []
    received_message = Derived.build_from_payload(payload, [lambda **kw: calls.append(kw)])
    assert received_message.full == "Ada Lovelace"  # computed again, with the default shout
    received_message.execute_callbacks()
    assert calls == [{"first": "Ada", "last": "Lovelace", "full": "Ada Lovelace"}]


def test_listeners_of_a_channel_with_computed_fields_must_accept_them():
    with pytest.raises(ListenerSignatureError, match="full"):
        pgpubsub.listener(Derived)(lambda first, last: None)

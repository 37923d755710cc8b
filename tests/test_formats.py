"""Pure formats: envelopes, client frames, Redis names, settings and the
command line."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.python import usage

from redmessenger.envelope import Envelope, MessageIds
from redmessenger.frames import (
    FINAL_CLOSE_CODES,
    FINAL_ERRORS,
    Hello,
    ProtocolError,
    parse_ack,
    parse_hello,
)
from redmessenger.keys import Namespace
from redmessenger.settings import AuthMode, RedisAddress
from redmessenger.tap import Options

REPO = Path(__file__).resolve().parent.parent


def test_envelopes_survive_being_stored_including_binary_payloads():
    ids = MessageIds()
    for payload in (b"Hello, world!", "é ✓".encode(), bytes(range(256)), b""):
        envelope = Envelope(ids(), "rm.groups.cats", 1438480701712, payload)
        back = Envelope.from_stored(envelope.stored(), "rm.users.x", ids, 0)
        assert (back.id, back.source, back.timestamp, back.payload, back.queued) == \
            (envelope.id, "rm.groups.cats", 1438480701712, payload, True)


def test_message_frames_carry_every_field():
    envelope = Envelope("i", "rm.users.u", 5, b"\xff")
    frame = json.loads(envelope.frame(bubble=True, tag=7))
    assert frame == {"type": "message", "id": "i", "source": "rm.users.u", "timestamp": 5,
                     "payload_base64": base64.b64encode(b"\xff").decode(), "bubble": True,
                     "queued": False, "tag": 7}
    assert envelope.frame(False) is envelope.frame(False)  # built once for all sockets


@pytest.mark.parametrize("raw", [b"plain", b'{"id": 1}', b"\xff\xfe", b'{"id":"a","source":"s",'
                                 b'"timestamp":1,"payload_base64":"!!"}', b"[]"])
def test_queue_entries_that_are_not_envelopes_are_their_own_payload(raw):
    envelope = Envelope.from_stored(raw, "rm.users.u", MessageIds(), 42)
    assert envelope.payload == raw and envelope.source == "rm.users.u"
    assert envelope.timestamp == 42 and envelope.queued


def test_ids_are_unique_across_generators():
    a, b = MessageIds(), MessageIds()
    assert len({a(), a(), b(), b()}) == 4


@pytest.mark.parametrize("text, hello", [
    ('{"id": "user1"}', Hello("user1")),
    ('{"id": "user1", "key": "k", "ack": true}', Hello("user1", "k", True)),
    ('{"id": "user1", "heartbeat": true}', Hello("user1", heartbeat=True)),
    ('{"id": "user1", "heartbeat": false}', Hello("user1")),
    ("user1", Hello("user1")),
    ("user1:token:with:colons", Hello("user1", "token:with:colons")),
    ('{"id": "a.b.c"}', Hello("a.b.c")),
])
def test_hellos(text, hello):
    assert parse_hello(text.encode()) == hello


@pytest.mark.parametrize("data", [b"{oops", b'{"id": 5}', b'{"id": ""}', b'{"id": "a b"}',
                                  b'{"id": "u", "key": 1}', b'{"id": "u", "ack": "yes"}',
                                  b'{"id": "u", "heartbeat": 1}',
                                  b"", b"\xff", b'{"key": "k"}', b"a" * 300, b"a\x00b",
                                  b'{"x":' + b"[" * 20000])
def test_bad_hellos(data):
    with pytest.raises(ProtocolError) as refusal:
        parse_hello(data)
    assert refusal.value.close_code == 4000 and refusal.value.error == "bad_hello"


def test_acks():
    assert parse_ack(b'{"type": "ack", "tag": 3}') == 3
    for bad in (b"x", b'{"type": "ack"}', b'{"type": "ack", "tag": -1}',
                b'{"type": "ack", "tag": true}', b'{"type": "nak", "tag": 1}',
                b"[" * 20000, b'{"type": "ack", "tag": 1, "x": ' + b"{" * 20000):
        with pytest.raises(ProtocolError) as refusal:
            parse_ack(bad)
        assert refusal.value.close_code == 4002


def test_every_client_gives_up_after_the_same_refusals():
    """The browser client's lists of final close codes and error codes, and
    the protocol's, are frames.py's (which the Python client uses)."""
    script = (REPO / "redmessenger" / "static" / "redmessenger.js").read_text()

    def js_set(name: str) -> str:
        match = re.search(rf"export const {name} = new Set\(\[(.*?)\]\);", script, re.DOTALL)
        assert match, f"redmessenger.js has no {name}"
        return match.group(1)

    assert {int(code) for code in re.findall(r"\d+", js_set("FINAL_CLOSE_CODES"))} \
        == FINAL_CLOSE_CODES
    assert set(re.findall(r'"(\w+)"', js_set("FINAL_ERRORS"))) == FINAL_ERRORS
    protocol = (REPO / "docs" / "protocol.rst").read_text()
    documented = re.search(r"that is not final \((.*?)\)", protocol, re.DOTALL)
    assert documented and {int(code) for code in re.findall(r"\d{4}", documented.group(1))} \
        == FINAL_CLOSE_CODES


def test_namespace():
    ns = Namespace("rm")
    assert ns.parse_channel("rm.users.a.b") == ("users", "a.b")
    assert ns.parse_channel("rm.groups.cats") == ("groups", "cats")
    assert ns.parse_channel("rm.users.") is None and ns.parse_channel("other.users.a") is None
    assert ns.queue("u") == "rm:users:u:messages" and ns.token("u") == "rm:users:u:key"
    assert ns.members("g") == "rm:groups:g:members"
    assert Namespace("a*b").patterns == (b"a\\*b.users.*", b"a\\*b.groups.*")


@pytest.mark.parametrize("url, address", [
    ("redis://localhost", RedisAddress(host="localhost")),
    ("redis://:s3cret@10.0.0.1:6380/2", RedisAddress("10.0.0.1", 6380, db=2, password="s3cret")),
    ("redis://user:pw@h/0", RedisAddress("h", password="pw", username="user")),
    ("unix:///run/redis.sock?db=3", RedisAddress(path="/run/redis.sock", db=3)),
    ("redis+sentinel://:pw@s1:26379,s2:26380/main/2?sentinel_password=sp",
     RedisAddress("s1", 26379, db=2, password="pw", sentinels=(("s1", 26379), ("s2", 26380)),
                  master_name="main", sentinel_password="sp")),
    ("rediss+sentinel://[::1]:26379/main?ca=/ca.pem",
     RedisAddress("::1", 26379, tls=True, ca_file="/ca.pem", sentinels=(("::1", 26379),),
                  master_name="main")),
])
def test_redis_urls(url, address):
    assert RedisAddress.from_url(url) == address


@pytest.mark.parametrize("url", ["http://x", "redis://h:port", "redis://h/db", "unix://",
                                 "redis+sentinel://s1/main", "redis+sentinel://s1:1,s2/main",
                                 "redis+sentinel://s1:1/", "redis+sentinel://s1:1/main/db"])
def test_bad_redis_urls(url):
    with pytest.raises(ValueError):
        RedisAddress.from_url(url)


@pytest.mark.parametrize("url", [
    "http://:s3cret@x", "redis://:s3cret@h:port", "redis://user:s3cret@h/db",
    "unix://:s3cret@", "unix://:s3cret@/run/redis.sock?db=x",
    "redis://:s3#cret@h:port", "redis://:s3/cr@et@h:port",
    "redis+sentinel://:s3cret@s1/main"])
def test_bad_redis_urls_hide_their_password(url, redis):
    """Before: the error quoted the URL as it was, password and all."""
    with pytest.raises(ValueError) as bad:
        RedisAddress.from_url(url)
    assert "s3" not in str(bad.value) and ":***@" in str(bad.value), bad.value
    with pytest.raises(usage.UsageError) as refused:
        Options().parseOptions(["--redis", url])
    assert "s3" not in str(refused.value), refused.value


def test_a_bad_sentinel_url_hides_the_sentinels_password():
    with pytest.raises(ValueError) as bad:
        RedisAddress.from_url("redis+sentinel://s1/main?sentinel_password=s3cret&ca=x")
    assert "s3cret" not in str(bad.value) and "sentinel_password=***&ca=x" in str(bad.value)


def test_a_sentinel_address_says_where_its_sentinels_are_and_its_master_is_plain():
    address = RedisAddress.from_url("redis+sentinel://s1:1,s2:2/main/3")
    assert str(address) == "redis+sentinel://s1:1,s2:2/main/3"
    master = address.at("10.0.0.5", 6380)
    assert master == RedisAddress("10.0.0.5", 6380, db=3)


def test_endpoint_descriptions():
    assert RedisAddress("h", 1).client_endpoint() == "tcp:host=h:port=1"
    assert RedisAddress(path="/a:b").client_endpoint() == "unix:path=/a\\:b"


def test_options_make_settings(redis):
    options = Options()
    options.parseOptions(["--port", "9000", "--redis", redis.url, "--auth", "optional",
                          "--queue-max", "5", "--prefix", "app", "-v"])
    settings = options.settings
    assert settings.listen_description == "tcp:9000:backlog=1024"
    assert settings.redis == redis.address and settings.auth is AuthMode.OPTIONAL
    assert settings.queue_max == 5 and settings.prefix == "app" and settings.verbose
    assert settings.data_dir == Path("redmessenger-data")


@pytest.mark.parametrize("argv", [["--auth", "maybe"], ["--redis", "http://x"],
                                  ["--queue-max", "-1"], ["--drain-chunk", "0"],
                                  ["--hello-timeout", "soon"], ["--prefix", ""]])
def test_bad_options(argv, redis):
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--redis", redis.url, *argv])


@pytest.mark.parametrize(("value", "on"), [
    ("1", True), ("true", True), ("YES", True), (" On ", True), ("True", True),
    ("0", False), ("false", False), ("No", False), ("OFF", False), ("", False)])
def test_flags_from_the_environment(monkeypatch, redis, value, on):
    monkeypatch.setenv("REDMESSENGER_VERBOSE", value)
    monkeypatch.setenv("REDMESSENGER_INBOX", value)
    options = Options()
    options.parseOptions(["--redis", redis.url])
    assert (options.settings.verbose, options.settings.inbox) == (on, on)
    options = Options()
    options.parseOptions(["--redis", redis.url, "--verbose"])  # the command line wins
    assert options.settings.verbose


@pytest.mark.parametrize("name", ["VERBOSE", "INBOX"])
@pytest.mark.parametrize("value", ["maybe", "nope", "2", "y", "enabled", "tru"])
def test_bad_flag_values_are_refused(monkeypatch, redis, name, value):
    """Before: anything but 1/true/yes/on was silently taken as off."""
    monkeypatch.setenv(f"REDMESSENGER_{name}", value)
    with pytest.raises(usage.UsageError) as refused:
        Options().parseOptions(["--redis", redis.url])
    assert f"REDMESSENGER_{name}" in str(refused.value) and repr(value) in str(refused.value)


def test_jwt_options(monkeypatch, redis):
    monkeypatch.setenv("REDMESSENGER_JWT_ISSUER", "https://issuer.example")
    options = Options()
    options.parseOptions(["--redis", redis.url, "--auth", "jwt", "--jwt-secret", "s" * 32,
                          "--jwt-audience", "messenger", "--jwt-max-age", "3600"])
    settings = options.settings
    assert (settings.jwt_audience, settings.jwt_issuer, settings.jwt_max_age) == \
        ("messenger", "https://issuer.example", 3600)
    defaults = Options()
    defaults.parseOptions(["--redis", redis.url])
    assert (defaults.settings.jwt_audience, defaults.settings.jwt_max_age) == (None, 0)
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--redis", redis.url, "--jwt-max-age", "-1"])


#: Queue entries as other programs might write them: bytes, JSON nested
#: deeper than the parser goes, and near-envelopes with fields of any type.
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=10)
_field = _json | st.text(st.characters() | st.characters(categories=["Cs"]), max_size=8)
_near_envelopes = st.fixed_dictionaries(
    {}, optional={"id": _field, "source": _field, "timestamp": _field | st.integers(),
                  "payload": _field, "payload_base64": _field | st.sampled_from(["", "QQ==", "!"]),
                  "extra": _json})
_entries = st.one_of(
    st.binary(),
    _json.map(lambda doc: json.dumps(doc).encode()),
    st.tuples(st.integers(990, 20000), st.sampled_from(["[", '{"a":', '{"id":"x","p":['])).map(
        lambda deep: (deep[1] * deep[0]).encode()),
    st.tuples(_near_envelopes, st.booleans()).map(
        lambda e: json.dumps(e[0], separators=(",", ":") if e[1] else None,
                             ensure_ascii=e[1]).encode("utf-8", "surrogatepass")))


@settings(max_examples=500, deadline=None)
@given(raw=_entries, bubble=st.booleans(), tag=st.none() | st.integers(1, 2**40))
def test_any_queue_entry_becomes_a_message(raw, bubble, tag):
    """Nothing stored can stop a drain: every entry reads as an envelope or
    as its own raw payload, and its frame is JSON carrying that payload."""
    envelope = Envelope.from_stored(raw, "rm.users.u", lambda: "new", 42)
    frame = json.loads(envelope.frame(bubble, tag))
    body = {k: v for k, v in frame.items() if k.startswith("payload")}
    assert len(body) == 1
    decoded = (body["payload"].encode("utf-8", "surrogatepass") if "payload" in body
               else base64.b64decode(body["payload_base64"]))
    assert decoded == envelope.payload
    assert frame["id"] == envelope.id and frame["source"] == envelope.source
    assert frame["queued"] is True and frame.get("tag") == tag
    if envelope.id == "new":
        assert envelope.payload == raw and envelope.source == "rm.users.u"
    back = Envelope.from_stored(envelope.stored(), "rm.users.v", lambda: "other", 0)
    assert (back.id, back.source, back.payload) == (envelope.id, envelope.source,
                                                     envelope.payload)


@settings(max_examples=300, deadline=None)
@given(uid=st.text(min_size=1), source=st.text(), timestamp=st.integers(0, 2**53),
       payload=st.binary() | st.text().map(lambda t: t.encode("utf-8", "surrogatepass")),
       bubble=st.booleans(), tag=st.none() | st.integers(1, 2**40))
def test_spliced_frames_are_the_json_they_claim_to_be(uid, source, timestamp, payload, bubble,
                                                      tag):
    """Frames are the stored JSON with fields around it, and drained entries
    are sent without being parsed: both must still be exactly this JSON."""
    ids = MessageIds()
    live = Envelope(uid, source, timestamp, payload)
    drained = Envelope.from_stored(live.stored(), "rm.users.x", ids, 0)
    assert (drained.id, drained.source, drained.timestamp, drained.payload) == \
        (uid, source, timestamp, payload)
    for envelope, queued in ((live, False), (drained, True)):
        frame = json.loads(envelope.frame(bubble, tag))
        body = {k: v for k, v in frame.items() if k.startswith("payload")}
        decoded = (body["payload"].encode("utf-8", "surrogatepass") if "payload" in body
                   else base64.b64decode(body["payload_base64"]))
        assert decoded == payload
        assert frame["id"] == uid and frame["source"] == source
        assert frame["timestamp"] == timestamp and frame["bubble"] is bubble
        assert frame["queued"] is queued and frame.get("tag") == tag
        assert list(frame)[:4] == ["type", "id", "source", "timestamp"]


@settings(max_examples=300, deadline=None)
@given(uid=st.text(min_size=1), source=st.text(), timestamp=st.integers(0, 2**53),
       payload=st.binary() | st.text().map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_the_stored_form_is_exactly_what_json_dumps_writes(uid, source, timestamp, payload):
    """Built by hand for speed, it must stay byte for byte json.dumps'."""
    try:
        body = {"payload": payload.decode("utf-8")}
    except UnicodeDecodeError:
        body = {"payload_base64": base64.b64encode(payload).decode("ascii")}
    expected = json.dumps({"id": uid, "source": source, "timestamp": timestamp, **body},
                          separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert Envelope(uid, source, timestamp, payload).stored() == expected

"""The pure protocol module: parsing, limits, replies."""

from __future__ import annotations

import json
import secrets
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessionstore.daemon import protocol as p


def error_code(frame: str) -> str:
    with pytest.raises(p.ProtocolError) as info:
        p.parse(frame)
    return info.value.code


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ('{"op":"hello"}', p.Hello()),
        ('{"op":"hello","v":1,"id":"1"}', p.Hello("1")),
        ('{"op":"ping","id":7}', p.Ping(7)),
        ('{"op":"get"}', p.Get()),
        ('{"op":"get","keys":["a","b"],"id":null}', p.Get(None, ("a", "b"))),
        ('{"op":"set","data":{"a":[1,{"b":2}]}}', p.Set(None, {"a": [1, {"b": 2}]})),
        (
            '{"op":"set","id":"x","data":null,"delete":["z"],"if_version":3}',
            p.Set("x", {}, ("z",), 3),
        ),
        ('{"op":"health"}', p.Health()),
        ('{"op":"close","id":"c"}', p.Close("c")),
        ('{"op":"logout"}', p.Logout()),
        ('{"op":"resume","token":"abc","extra":true}', p.Resume("abc")),
    ],
)
def test_parse_builtin_ops(frame: str, expected: p.Request) -> None:
    assert p.parse(frame) == expected


def test_parse_application_op_keeps_the_whole_message() -> None:
    request = p.parse('{"op":"chat.send","id":"9","text":"hi"}')
    assert request == p.AppRequest("chat.send", {"op": "chat.send", "id": "9", "text": "hi"}, "9")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("", "bad_json"),
        ("{", "bad_json"),
        ("nope", "bad_json"),
        ('{"op":"ping"} trailing', "bad_json"),
        ("NaN", "bad_json"),
        ('{"op":"set","data":{"x":Infinity}}', "bad_json"),
        ('{"op":"set","data":{"x":1e999}}', "bad_json"),
        ('{"op":"set","data":{"x":' + "9" * 20 + "}}", "bad_json"),
        ('{"op":"set","data":{"x":' + "9" * 5000 + "}}", "bad_json"),
        ("[" * 50 + "]" * 50, "not_object"),
        ('{"op":"set","data":' + '{"a":' * 40 + "1" + "}" * 41, "bad_json"),
        ("[" * 100_000, "bad_json"),
        ("[]", "not_object"),
        ('"op"', "not_object"),
        ("null", "not_object"),
        ("{}", "missing_op"),
        ('{"id":"1"}', "missing_op"),
        ('{"op":1}', "bad_type"),
        ('{"op":null}', "bad_type"),
        ('{"op":"ping","id":true}', "bad_type"),
        ('{"op":"ping","id":1.5}', "bad_type"),
        ('{"op":"ping","id":[1]}', "bad_type"),
        ('{"op":"ping","id":"' + "x" * 129 + '"}', "bad_value"),
        ('{"op":"hello","v":2}', "unsupported_version"),
        ('{"op":"hello","v":"1"}', "bad_type"),
        ('{"op":"resume"}', "bad_type"),
        ('{"op":"resume","token":42}', "bad_type"),
        ('{"op":"get","keys":"a"}', "bad_type"),
        ('{"op":"get","keys":[1]}', "bad_type"),
        ('{"op":"set","data":[1]}', "bad_type"),
        ('{"op":"set","data":"x"}', "bad_type"),
        ('{"op":"set","delete":"a"}', "bad_type"),
        ('{"op":"set","if_version":"3"}', "bad_type"),
        ('{"op":"set","if_version":true}', "bad_type"),
        ('{"op":"set","if_version":1.0}', "bad_type"),
        ('{"op":"set","if_version":-1}', "bad_value"),
        ('{"op":""}', "bad_value"),
        ('{"op":"has space"}', "bad_value"),
        ('{"op":"' + "a" * 65 + '"}', "bad_value"),
    ],
)
def test_parse_rejects(frame: str, code: str) -> None:
    assert error_code(frame) == code


def test_error_keeps_the_request_id_when_readable() -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse('{"op":"set","id":"k","data":5}')
    assert info.value.request_id == "k"
    assert info.value.code == "bad_type"


def test_depth_limit_is_exactly_max_depth() -> None:
    nested: Any = 1
    for _ in range(p.MAX_DEPTH - 1):
        nested = {"a": nested}
    ok = {"op": "set", "data": nested}  # the frame is level 1, data starts at 2
    assert isinstance(p.parse(json.dumps(ok)), p.Set)
    too_deep = {"op": "set", "data": {"a": nested}}
    assert error_code(json.dumps(too_deep)) == "bad_json"


def test_64_bit_integers_are_the_limit() -> None:
    assert p.parse(json.dumps({"op": "set", "data": {"x": 2**63 - 1}})) == p.Set(
        None, {"x": 2**63 - 1}
    )
    assert p.parse(json.dumps({"op": "set", "data": {"x": -(2**63)}})) == p.Set(
        None, {"x": -(2**63)}
    )
    assert error_code(json.dumps({"op": "set", "data": {"x": 2**63}})) == "bad_json"


def test_bytes_are_decoded_as_utf8() -> None:
    assert p.parse(b'{"op":"ping"}') == p.Ping()
    assert error_code(b"\xff\xfe") == "bad_json"  # type: ignore[arg-type]


def test_resume_repr_hides_the_token() -> None:
    token = secrets.token_urlsafe(32)
    assert token not in repr(p.parse(json.dumps({"op": "resume", "token": token})))


def test_token_shape() -> None:
    assert p.is_wellformed_token(secrets.token_urlsafe(32))
    assert p.is_wellformed_token(secrets.token_urlsafe(64))
    assert not p.is_wellformed_token("")
    assert not p.is_wellformed_token("short")
    assert not p.is_wellformed_token(secrets.token_urlsafe(32) + "=")
    assert not p.is_wellformed_token("a" * 129)
    # One character outside the URL-safe alphabet, at a fixed place, spoils it.
    good = secrets.token_urlsafe(32)
    for bad in "/+=. \x00'":
        assert not p.is_wellformed_token(good[:10] + bad + good[11:])


def test_close_codes() -> None:
    assert (
        p.CLOSE_NORMAL,
        p.CLOSE_GOING_AWAY,
        p.CLOSE_TOO_BIG,
        p.CLOSE_SERVICE_RESTART,
        p.CLOSE_TRY_AGAIN_LATER,
        p.CLOSE_SESSION_GONE,
        p.CLOSE_SUPERSEDED,
        p.CLOSE_PROTOCOL_ERROR,
        p.CLOSE_HANDSHAKE_TIMEOUT,
    ) == (1000, 1001, 1009, 1012, 1013, 4002, 4003, 4004, 4005)


def test_replies() -> None:
    assert p.pong_reply("1") == {"op": "pong", "re": "1"}
    assert p.bye_reply(None) == {"op": "bye", "re": None}
    assert p.result_reply(2, version=3) == {"op": "result", "re": 2, "version": 3}
    assert p.error_reply("e", "too_large", "big", limit=10) == {
        "op": "error",
        "re": "e",
        "code": "too_large",
        "message": "big",
        "limit": 10,
    }
    assert p.superseded_notice() == {"op": "superseded"}
    assert p.health_reply(None, {"status": "ok"}) == {"op": "health", "re": None, "status": "ok"}
    welcome = p.welcome_reply(
        "1",
        session_id="s",
        token="t",
        recovered=False,
        reason="new",
        idle_timeout_s=60.0,
        boot_id="b",
        server_time=1.0,
        data={"a": 1},
        version=1,
    )
    assert json.loads(p.encode(welcome)) == welcome
    assert welcome["op"] == "welcome"
    with pytest.raises(ValueError, match="Out of range"):
        p.encode({"op": "result", "x": float("nan")})


def test_close_reason_fits_in_a_close_frame() -> None:
    assert p.close_reason("short") == "short"
    cut = p.close_reason("é" * 100)
    assert len(cut.encode()) <= 123
    assert cut == "é" * 61


PARSE_CODES = {
    "bad_json",
    "not_object",
    "missing_op",
    "bad_type",
    "bad_value",
    "unsupported_version",
}


def outcome(frame: str) -> str:
    """``ok`` or the error code: nothing but ProtocolError may escape parse()."""
    try:
        request = p.parse(frame)
    except p.ProtocolError as exc:
        return exc.code
    assert request.id is None or isinstance(request.id, str | int)
    return "ok"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parse_never_fails_unexpectedly_on_text(frame: str) -> None:
    assert outcome(frame) in {"ok", *PARSE_CODES}


frame_like = st.dictionaries(
    st.sampled_from(["op", "id", "v", "token", "keys", "data", "delete", "if_version", "x"]),
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.sampled_from(["hello", "resume", "ping", "get", "set", "health", "close", "logout"])
    | st.lists(st.text(max_size=3) | st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(frame_like)
def test_parse_never_fails_unexpectedly_on_near_valid_frames(frame: dict[str, Any]) -> None:
    assert outcome(json.dumps(frame)) in {"ok", *PARSE_CODES}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_set_round_trips_any_json_object(data: dict[str, Any]) -> None:
    request = p.parse(json.dumps({"op": "set", "id": "s", "data": data}))
    assert request == p.Set("s", data)


@pytest.mark.parametrize(
    ("depth", "inner"),
    [(1979, ""), (200, '"\\ud800"'), (500, '"\\ud800"')],
    ids=["deep", "a lone surrogate deep", "a lone surrogate deeper"],
)
def test_a_frame_nested_too_deep_for_the_stack_gets_the_same_answer_at_any_depth(
    depth: int, inner: str
) -> None:
    # Found by the fuzz test in CI: inside a connection handler the decoder ran out of
    # stack ("nested too deeply") where a shallower caller got the depth check's
    # message, for the same frame. And by review: the surrogate check, which encodes
    # the value, ran before the depth check, and could run out of stack itself.
    frame = '{"op":"set","data":{"x":' + "[" * depth + inner + "]" * depth + "}}"

    def parse_at(depth: int) -> p.ProtocolError:
        if depth:
            return parse_at(depth - 1)
        with pytest.raises(p.ProtocolError) as caught:
            p.parse(frame)
        return caught.value

    answers = {(e.code, e.message) for e in (parse_at(0), parse_at(sys.getrecursionlimit() - 80))}
    assert answers == {("bad_json", f"nested deeper than {p.MAX_DEPTH} levels")}

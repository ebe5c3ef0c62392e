"""Connection keys and the recipients of event requests: keys and wildcard selectors
(docs/protocol.md, "Connection keys" and "Addressing a user or a session")."""

import pytest

from orbited.core.keys import (
    WILDCARD,
    ConnectionKey,
    KeyError_,
    Selector,
    parse_recipient,
)

SESSION_MSG = 'a wildcard session needs a wildcard location: [user, "*", "*"]'
USER_MSG = "key user cannot be a wildcard"


def test_wildcard_is_the_whole_string_star():
    assert WILDCARD == "*"


@pytest.mark.parametrize(
    "value, expected",
    [
        (["alice", "*", "*"], Selector("alice", None)),
        (["alice", "s1", "*"], Selector("alice", "s1")),
        (["alice", "", "*"], Selector("alice", "")),  # the empty session is a session
        (["alice", "s1", "/chat"], ConnectionKey("alice", "s1", "/chat")),
        (["alice", "", ""], ConnectionKey("alice", "", "")),
        # Only the whole string is a wildcard.
        (["alice", "s*", "/*"], ConnectionKey("alice", "s*", "/*")),
        (["a*", "**", " *"], ConnectionKey("a*", "**", " *")),
        (["é" * 128, "*", "*"], Selector("é" * 128, None)),  # 256 bytes: the slow path
        (["u" * 65, "s", "/l"], ConnectionKey("u" * 65, "s", "/l")),
    ],
)
def test_recipients(value, expected):
    got = parse_recipient(value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "value, message",
    [
        (["alice", "*", "/chat"], SESSION_MSG),
        (["alice", "*", ""], SESSION_MSG),
        (["*", "*", "*"], USER_MSG),
        (["*", "s", "/l"], USER_MSG),
        (["*", "s", "*"], USER_MSG),
        (["alice", "*", "*", "*"], "a connection key is an array [user, session, location]"),
        (["alice", "*"], "a connection key is an array [user, session, location]"),
        ("alice", "a connection key is an array [user, session, location]"),
        ({"user": "alice"}, "a connection key is an array [user, session, location]"),
        (["", "*", "*"], "key user must not be empty"),
        (["alice", 1, "*"], "key session must be a string"),
        (["alice", "*", None], "key location must be a string"),
        (["u" * 257, "*", "*"], "key user longer than 256 bytes"),
        (["u", "s" * 257, "*"], "key session longer than 256 bytes"),
    ],
)
def test_bad_recipients(value, message):
    with pytest.raises(KeyError_) as e:
        parse_recipient(value)
    assert str(e.value) == message


def test_selector_matches_its_keys():
    user, session = Selector("alice", None), Selector("alice", "s1")
    for key, of_user, of_session in [
        (ConnectionKey("alice", "s1", "/a"), True, True),
        (ConnectionKey("alice", "s2", "/a"), True, False),
        (ConnectionKey("alice", "", ""), True, False),
        (ConnectionKey("alicex", "s1", "/a"), False, False),
        (ConnectionKey("Alice", "s1", "/a"), False, False),
    ]:
        assert user.matches(key) is of_user
        assert session.matches(key) is of_session
    assert Selector("alice", "").matches(ConnectionKey("alice", "", "/x"))
    assert not Selector("alice", "").matches(ConnectionKey("alice", "s", "/x"))


def test_selector_json_round_trip():
    for selector in (Selector("alice", None), Selector("alice", "s1"), Selector("b", "")):
        assert parse_recipient(selector.to_json()) == selector
    assert Selector("alice", None).to_json() == ["alice", "*", "*"]
    assert Selector("alice", "s1").to_json() == ["alice", "s1", "*"]
    assert str(Selector("alice", None)) == "(alice, *, *)"


def test_a_selector_never_equals_a_key():
    """Both are tuples; a dict of recipients must not confuse them."""
    assert Selector("a", "b") != ConnectionKey("a", "b", "*")
    assert len({Selector("a", None), ConnectionKey("a", "*", "*")}) == 2


def test_plain_keys_from_json_are_unchanged():
    """ConnectionKey.from_json (tokens, hand-off) does not interpret wildcards."""
    assert ConnectionKey.from_json(["alice", "*", "*"]) == ConnectionKey("alice", "*", "*")

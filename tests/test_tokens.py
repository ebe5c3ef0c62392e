"""Browser tokens (docs/protocol.md, "Tokens")."""

import time

import jwt
import pytest

from orbited.keys import ConnectionKey
from orbited.tokens import TokenError, issue_token, load_secret, verify_token

SECRET = b"s" * 32
KEY = ConnectionKey("alice", "s1", "/chat")


def test_round_trip():
    assert verify_token(SECRET, issue_token(SECRET, KEY, ttl=60)) == KEY


def code_of(token: str, **kw) -> str:
    with pytest.raises(TokenError) as info:
        verify_token(SECRET, token, **kw)
    return info.value.code


def test_expired_token():
    token = issue_token(SECRET, KEY, ttl=60, now=1000)
    assert verify_token(SECRET, token, now=1050) == KEY
    assert code_of(token, now=1100) == "token_expired"
    assert code_of(issue_token(SECRET, KEY, ttl=1, now=time.time() - 100)) == "token_expired"


def test_forged_token():
    forged = issue_token(b"x" * 32, KEY)
    assert code_of(forged) == "token_invalid"


def test_tampered_claims():
    header, _, sig = issue_token(SECRET, KEY).split(".")
    other = issue_token(SECRET, ConnectionKey("mallory", "s1", "/chat")).split(".")[1]
    assert code_of(f"{header}.{other}.{sig}") == "token_invalid"


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "x" * 5000])
def test_malformed(token):
    assert code_of(token) in {"token_missing", "token_malformed"}


def test_alg_none_and_other_algorithms_refused():
    claims = {"sub": "alice", "aud": "orbited", "exp": time.time() + 60}
    assert code_of(jwt.encode(claims, None, algorithm="none")) in {
        "token_invalid",
        "token_malformed",
    }
    assert code_of(jwt.encode(claims, SECRET * 2, algorithm="HS512")) == "token_invalid"


def test_missing_expiry_or_audience_refused():
    assert code_of(jwt.encode({"sub": "a", "aud": "orbited"}, SECRET)) == "token_invalid"
    assert code_of(jwt.encode({"sub": "a", "exp": time.time() + 60}, SECRET)) == "token_invalid"


def test_short_secret_refused():
    with pytest.raises(ValueError):
        issue_token(b"short", KEY)


def test_secret_file_created_private(tmp_path):
    path = tmp_path / "dir" / "secret"
    secret = load_secret(path, create=True)
    assert len(secret) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_secret(path) == secret


def test_verified_token_cache_still_checks_expiry_secret_and_signature():
    """A token verified once is answered from the cache (long-polls present it on every
    poll), but expiry is checked again, another secret misses the cache, and a token
    that differs by a byte is verified afresh."""
    from orbited import tokens

    token = issue_token(SECRET, KEY, ttl=60, now=5000)
    assert verify_token(SECRET, token, now=5010) == KEY
    assert (SECRET, token) in tokens._verified
    assert verify_token(SECRET, token, now=5050) == KEY  # from the cache
    assert code_of(token, now=5100) == "token_expired"  # leeway 30 s past exp 5060
    with pytest.raises(TokenError) as info:
        verify_token(b"y" * 32, token, now=5010)
    assert info.value.code == "token_invalid"
    header, claims, sig = token.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    assert code_of(f"{header}.{claims}.{flipped}", now=5010) == "token_invalid"


def test_verified_token_cache_is_bounded(monkeypatch):
    from orbited import tokens

    monkeypatch.setattr(tokens, "VERIFIED_CACHE_SIZE", 3)
    issued = [issue_token(SECRET, ConnectionKey(f"u{i}", "", ""), ttl=60) for i in range(5)]
    for token in issued:
        verify_token(SECRET, token)
    assert len(tokens._verified) <= 3
    assert (SECRET, issued[-1]) in tokens._verified and (SECRET, issued[0]) not in tokens._verified


def test_verified_token_cache_forgets_tokens_not_used_for_a_while(monkeypatch):
    """The cache holds the tokens in use (a long-poll's, presented every poll), not every
    page's token since start: one idle for VERIFIED_IDLE is dropped at the next insert."""
    from orbited import tokens

    clock = [1000.0]
    monkeypatch.setattr(tokens, "_monotonic", lambda: clock[0])
    monkeypatch.setattr(tokens, "_verified", type(tokens._verified)())
    polling, gone, fresh = (
        issue_token(SECRET, ConnectionKey(f"u{i}", "", ""), ttl=3600) for i in range(3)
    )
    verify_token(SECRET, polling)
    verify_token(SECRET, gone)
    for _ in range(4):  # the polling page comes back every 40 s; the other never does
        clock[0] += 40
        verify_token(SECRET, polling)
    verify_token(SECRET, fresh)  # 160 s after `gone` was last used
    assert list(tokens._verified) == [(SECRET, polling), (SECRET, fresh)]

"""Browser tokens (docs/protocol.md, "Tokens")."""

import time

import jwt
import pytest

from orbited.core.keys import ConnectionKey
from orbited.core.tokens import TokenError, issue_token, load_secret, verify_token

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
    from orbited.core import tokens

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


def test_a_token_verified_without_remember_is_not_kept_but_a_kept_one_is_used(monkeypatch):
    """``remember=False`` (a WebSocket's one use of its token): the same checks and key,
    no cache entry; a token already kept is still answered from the cache."""
    from orbited.core import tokens

    monkeypatch.setattr(tokens, "_verified", type(tokens._verified)())
    once = issue_token(SECRET, KEY, ttl=60, now=5000)
    assert verify_token(SECRET, once, now=5010, remember=False) == KEY
    assert (SECRET, once) not in tokens._verified
    with pytest.raises(TokenError) as info:
        verify_token(SECRET, once, now=5100, remember=False)
    assert info.value.code == "token_expired"
    assert verify_token(SECRET, once, now=5010) == KEY  # (a poll's use keeps it)
    assert (SECRET, once) in tokens._verified
    monkeypatch.setattr(tokens, "_verified_claims", None)  # a hit does no crypto
    assert verify_token(SECRET, once, now=5020, remember=False) == KEY


def test_verified_token_cache_is_bounded(monkeypatch):
    from orbited.core import tokens

    monkeypatch.setattr(tokens, "VERIFIED_CACHE_SIZE", 3)
    issued = [issue_token(SECRET, ConnectionKey(f"u{i}", "", ""), ttl=60) for i in range(5)]
    for token in issued:
        verify_token(SECRET, token)
    assert len(tokens._verified) <= 3
    assert (SECRET, issued[-1]) in tokens._verified and (SECRET, issued[0]) not in tokens._verified


def test_verified_token_cache_forgets_tokens_not_used_for_a_while(monkeypatch):
    """The cache holds the tokens in use (a long-poll's, presented every poll), not every
    page's token since start: one idle for VERIFIED_IDLE is dropped at the next insert."""
    from orbited.core import tokens

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


# -- claim types, sizes and encodings (docs/protocol.md, "Tokens") ---------------------

import base64  # noqa: E402
import hashlib  # noqa: E402
import hmac  # noqa: E402
import json  # noqa: E402

FUTURE = 1_893_456_000  # 2030-01-01


def signed(payload: bytes | dict, secret: bytes = SECRET) -> str:
    """A correctly signed HS256 token with exactly these payload bytes (PyJWT's encoder
    cannot write every payload a forger or a buggy web app could)."""
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(payload)
    sig = hmac.new(secret, head.encode(), hashlib.sha256).digest()
    return head + "." + b64(sig)


def claims(**changes) -> dict:
    doc = {"sub": "alice", "sid": "s1", "loc": "/chat", "aud": "orbited", "iat": 1000,
           "exp": FUTURE}  # fmt: skip
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not ...}


@pytest.fixture
def fresh_cache(monkeypatch):
    from orbited.core import tokens

    monkeypatch.setattr(tokens, "_verified", type(tokens._verified)())
    return tokens._verified


def test_signed_helper_makes_tokens_that_verify(fresh_cache):
    assert verify_token(SECRET, signed(claims())) == KEY
    assert verify_token(SECRET, signed(claims(aud=["other", "orbited"]))) == KEY
    assert verify_token(SECRET, signed(claims(exp=FUTURE + 0.5, iat=...))) == KEY


@pytest.mark.parametrize("clock", [{}, {"now": 2000}], ids=["wall clock", "injected clock"])
def test_string_exp_is_malformed_every_time_and_never_cached(fresh_cache, clock):
    """A numeric-string exp was accepted on the wall-clock path (production), cached, and
    every later use raised TypeError (HTTP 500 on every transport)."""
    token = signed(claims(exp=str(FUTURE)))
    for _ in range(3):
        assert code_of(token, **clock) == "token_malformed"
    assert not fresh_cache


BAD_CLAIMS = {
    "exp string": claims(exp="1893456000"),
    "exp true": claims(exp=True),
    "exp null": claims(exp=None),
    "exp array": claims(exp=[FUTURE]),
    "exp negative": claims(exp=-1),
    "exp too large int": claims(exp=2**53),
    "exp huge int": claims(exp=10**400),
    "iat string": claims(iat="1000"),
    "iat false": claims(iat=False),
    "nbf string": claims(nbf="1000"),
    "nbf object": claims(nbf={"t": 1}),
    "sub integer": claims(sub=7),
    "sub true": claims(sub=True),
    "sub null": claims(sub=None),
    "sub empty": claims(sub=""),
    "sub 257 bytes": claims(sub="é" * 128 + "x"),
    "sid integer": claims(sid=1),
    "loc array": claims(loc=["/chat"]),
    "loc 257 bytes": claims(loc="x" * 257),
    "aud integer": claims(aud=1),
    "aud array of integers": claims(aud=[1, "orbited"]),
    "iss integer": claims(iss=5),
    "jti object": claims(jti={}),
}


@pytest.mark.parametrize("clock", [{}, {"now": 2000}], ids=["wall clock", "injected clock"])
@pytest.mark.parametrize("doc", BAD_CLAIMS.values(), ids=BAD_CLAIMS.keys())
def test_claims_of_the_wrong_type_or_size_are_malformed(fresh_cache, doc, clock):
    assert code_of(signed(doc), **clock) == "token_malformed"
    assert not fresh_cache


def raw_claims(text: str) -> bytes:
    return text.replace("EXP", str(FUTURE)).encode()


BAD_PAYLOADS = {
    "lone surrogate in sub": raw_claims('{"sub":"\\ud800","aud":"orbited","exp":EXP}'),
    "lone surrogate in an unknown claim": raw_claims(
        '{"sub":"a","aud":"orbited","exp":EXP,"x":"\\udfff"}'
    ),
    "lone surrogate in a key": raw_claims('{"sub":"a","aud":"orbited","exp":EXP,"\\ud800":1}'),
    "exp 1e999 (infinite)": raw_claims('{"sub":"a","aud":"orbited","exp":1e999}'),
    "exp NaN": raw_claims('{"sub":"a","aud":"orbited","exp":NaN}'),
    "exp Infinity": raw_claims('{"sub":"a","aud":"orbited","exp":Infinity}'),
    "duplicate sub": raw_claims('{"sub":"a","sub":"b","aud":"orbited","exp":EXP}'),
    "not UTF-8": b'{"sub":"\xff","aud":"orbited","exp":1893456000}',
    "UTF-8 BOM": b'\xef\xbb\xbf{"sub":"a","aud":"orbited","exp":1893456000}',
    "not an object": b'["a"]',
    "not JSON": b"sub=a",
    "nested too deeply": b'{"sub":"a","aud":"orbited","exp":1893456000,"x":'
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}",
}


@pytest.mark.parametrize("clock", [{}, {"now": 2000}], ids=["wall clock", "injected clock"])
@pytest.mark.parametrize("payload", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_payloads_that_are_not_strict_json_objects_are_malformed(fresh_cache, payload, clock):
    token = signed(payload)
    if len(token) > 4096:  # the length limit answers first
        payload = payload[:40] + b"[" * 1500 + b"]" * 1500 + b"}"
        token = signed(payload)
    assert code_of(token, **clock) == "token_malformed"
    assert not fresh_cache


@pytest.mark.parametrize("clock", [{}, {"now": 100_000}], ids=["wall clock", "injected clock"])
def test_missing_claims_wrong_audience_and_future_tokens_are_invalid(fresh_cache, clock):
    now = clock.get("now", time.time())
    assert code_of(signed(claims(sub=...)), **clock) == "token_invalid"
    assert code_of(signed(claims(exp=...)), **clock) == "token_invalid"
    assert code_of(signed(claims(aud=...)), **clock) == "token_invalid"
    assert code_of(signed(claims(aud="other")), **clock) == "token_invalid"
    assert code_of(signed(claims(aud=[])), **clock) == "token_invalid"
    assert code_of(signed(claims(nbf=now + 3600)), **clock) == "token_invalid"
    assert code_of(signed(claims(iat=now + 3600)), **clock) == "token_invalid"
    # within the leeway, and a malformed claim wins over a missing one
    assert verify_token(SECRET, signed(claims(nbf=now + 10, iat=now + 10)), **clock) == KEY
    assert code_of(signed(claims(sub=..., exp="x")), **clock) == "token_malformed"
    assert code_of(signed(claims(exp=now - 3600)), **clock) == "token_expired"


def test_a_header_with_a_bad_kid_or_crit_is_malformed_a_wrong_alg_invalid(fresh_cache):
    def with_header(header: dict) -> str:
        token = signed(claims())
        head = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
        return head + token[token.index(".") :]

    assert code_of(with_header({"alg": "HS256", "kid": 5})) == "token_malformed"
    assert code_of(with_header({"alg": "HS256", "crit": ["exp"]})) == "token_malformed"
    assert code_of(with_header({"alg": "HS256", "crit": 1})) == "token_malformed"
    assert code_of(with_header({"alg": 5})) == "token_invalid"
    assert code_of(with_header({"typ": "JWT"})) == "token_invalid"  # no alg


def test_signature_is_checked_before_the_claims(fresh_cache):
    assert code_of(signed(claims(exp="soon"), b"f" * 32)) == "token_invalid"
    assert code_of(signed(b"not json", b"f" * 32)) == "token_invalid"


def test_bad_claims_never_echo_the_token_in_the_message(fresh_cache):
    for doc in [claims(sub=7), claims(exp="\u2028<script>"), claims(aud="<b>x</b>")]:
        with pytest.raises(TokenError) as info:
            verify_token(SECRET, signed(doc))
        assert "<" not in info.value.message and "\u2028" not in info.value.message
        assert info.value.message.isascii()


@pytest.mark.slow
def test_a_string_exp_token_is_refused_with_401_on_every_use_and_transport(tmp_path):
    """End to end (the defect answered HTTP 500 from the second use on)."""
    import urllib.error
    import urllib.request

    from websockets.exceptions import ConnectionClosed, InvalidStatus

    from tests.conftest import SECRET as NODE_SECRET
    from tests.conftest import NodeProcess

    node = NodeProcess(tmp_path).start()
    try:
        token = signed(claims(exp=str(FUTURE)), NODE_SECRET)
        for _ in range(3):
            status, body = node.poll(f"token={token}")
            assert status == 401 and body["error"]["code"] == "token_malformed"
        for method, path in [("GET", "sse"), ("GET", "iframe"), ("POST", "ack")]:
            url = f"http://{node.http}/orbited/{path}?token={token}&origin=http://x&last=s:1"
            for _ in range(2):
                with pytest.raises(urllib.error.HTTPError) as info:
                    urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10)
                assert info.value.code == 401, path
                assert json.loads(info.value.read())["error"]["code"] == "token_malformed"
        for _ in range(2):
            try:
                with node.ws(token) as ws:
                    ws.recv(timeout=5)
                raise AssertionError("the WebSocket stayed open")
            except ConnectionClosed as e:
                assert e.rcvd.code == 4401 and e.rcvd.reason.startswith("token_malformed")
            except InvalidStatus as e:  # (refused at the handshake)
                assert e.response.status_code == 401
    finally:
        node.stop()


# -- "*" is reserved: the wildcard of event requests (docs/protocol.md, "Tokens") --------


@pytest.mark.parametrize(
    "key, claim",
    [
        (ConnectionKey("alice", "*", "/chat"), "sid"),
        (ConnectionKey("alice", "s1", "*"), "loc"),
        (ConnectionKey("alice", "*", "*"), "sid"),
        (ConnectionKey("*", "s1", "/chat"), "sub"),
    ],
)
def test_issuing_a_token_with_a_wildcard_part_raises(key, claim):
    with pytest.raises(ValueError, match=f'{claim} must not be "\\*"'):
        issue_token(SECRET, key)


@pytest.mark.parametrize("claim", ["sub", "sid", "loc"])
def test_a_token_with_a_wildcard_part_is_invalid(fresh_cache, claim):
    with pytest.raises(TokenError) as info:
        verify_token(SECRET, signed(claims(**{claim: "*"})))
    assert info.value.code == "token_invalid"
    assert info.value.message == f'{claim} must not be "*"'
    assert not fresh_cache  # never cached


@pytest.mark.parametrize("part", ["s*", "**", "* ", ""])
def test_only_the_whole_string_star_is_reserved(fresh_cache, part):
    key = ConnectionKey("alice", part, part)
    assert verify_token(SECRET, issue_token(SECRET, key)) == key
    assert verify_token(SECRET, signed(claims(sid=part, loc=part))) == key


COMMON_SHAPE = {
    "accepted": claims(),
    "no sid or loc": claims(sid=..., loc=...),
    "iat at the leeway's edge": claims(iat=2030),
    "exp at the leeway's edge": claims(exp=1970),
    "exp past the leeway": claims(exp=1969),
    "iat past the leeway": claims(iat=2031),
    "negative exp": claims(exp=-5),
    "negative iat": claims(iat=-1),
    "float exp": claims(exp=FUTURE + 0.5),
    "a wildcard sid": claims(sid="*"),
    "aud in an array": claims(aud=["orbited"]),
    "another aud": claims(aud="orbitedx"),
    "an extra claim": claims(nbf=1000),
    "non-ASCII sub": claims(sub="é"),
    "empty sub": claims(sub=""),
    "sub of 256 and 257 bytes": claims(sub="x" * 256, loc="y" * 257),
    "exp at the largest date": claims(exp=2**53 - 1),
    "exp past it": claims(exp=2**53),
}


@pytest.mark.parametrize("doc", COMMON_SHAPE.values(), ids=COMMON_SHAPE.keys())
def test_the_common_claims_are_decided_as_the_full_check_decides(monkeypatch, doc):
    """_check_claims accepts issue_token's shape at once: exactly when, and with what,
    the ordered checks would (they run when the shape is not the common one)."""
    from orbited.core import tokens

    def decide() -> object:
        try:
            return tokens._check_claims(doc, 30.0, 2000.0)
        except TokenError as e:
            return (e.code, e.message)

    fast = decide()
    monkeypatch.setattr(tokens, "_COMMON_CLAIMS", frozenset())  # never the common shape
    assert decide() == fast


def test_a_short_key_file_is_refused_with_its_name(tmp_path):
    # Before, every key file's refusal named "the shared secret", also a publish key's.
    from orbited.core.tokens import load_secret

    path = tmp_path / "publish.key"
    path.write_bytes(b"k" * 31 + b"\n")
    with pytest.raises(ValueError, match=f"{path}: a key must be at least 32 bytes .*not 31"):
        load_secret(path)
    path.write_bytes(b"  " + b"k" * 32 + b"\n")
    assert load_secret(path) == b"k" * 32

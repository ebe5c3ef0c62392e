/* orbited.core._speedups: C twins of the pure functions the node's hot paths spend most on.
 *
 * Each has a Python twin that stays the reference and runs wherever this module is not
 * built (setup.py builds it where a C compiler and OpenSSL's headers are found); tests/core/
 * test_speedups.py checks each against its twin. Why C: after every Python-level cut, the
 * request head, the token, the route and the accept key were half of what a WebSocket
 * accept costs beyond the bare socket work, and reading the SP request a fifth of an
 * event's CPU (docs/performance.md, "Accepts, seventh pass"; "The per-event path, sixth pass").
 * SHA-1 and SHA-256 are OpenSSL's (libcrypto, as hashlib's), through its low-level API: a
 * state is a plain struct, so a key's HMAC state is set up once and copied per token.
 *
 * - Key(secret).claims(token: str, known: set[bytes], now: float, leeway: float)
 *       -> (sub, sid, loc, exp) | None
 *   The check of the token every web app issues (orbited.core.tokens.issue_token's): a
 *   header segment in ``known`` (headers of tokens that verified before), the signature the
 *   canonical base64url of the HMAC-SHA256, a payload segment without padding holding
 *   compact JSON (no whitespace, no escapes) of the claims sub, sid, loc, aud (strings of
 *   printable ASCII) and exp, iat (integers), each at most once and nothing else, passing
 *   every check of orbited.core.tokens._check_claims. Then the answer is the Python check's.
 *   Anything else, or any doubt, is None: the Python check decides, and words every
 *   refusal, so this refuses nothing.
 * - route_of_user(user: str, routes: int) -> int | None
 *   orbited.core.hashing's version 2 route (SHA-256 of the u32 big-endian length and the
 *   bytes of the user, the first 8 bytes of the digest modulo routes, plus 1) of an ASCII
 *   user and 1 <= routes < 2**63; None otherwise (the Python twin decides).
 * - accept_key(key: bytes) -> bytes
 *   RFC 6455's Sec-WebSocket-Accept: base64 of the SHA-1 of the key and the GUID
 *   (orbited.node.transports.wsframe.accept_key's twin).
 * - read_get_head(data: bytes, wanted: frozenset[bytes], max_headers: int, small: int)
 *       -> (url, headers, end, upgrade) | None
 *   The common browser request head, whole in ``data``, as the node's head reader
 *   (orbited.node.transports.httpfront.HeadReader, llhttp by httptools) reads it: a GET on
 *   HTTP/1.1 of an origin-form URL of printable ASCII without '#', header lines of a token,
 *   a colon, optional blanks and a value of printable ASCII (blanks inside only), at most
 *   ``max_headers`` of them and at most ``small`` bytes in all; no Content-Length,
 *   Transfer-Encoding or Proxy-Connection; Connection and Upgrade at most once each,
 *   Connection a list of "keep-alive" and "upgrade" only. ``headers``: the lower-case names
 *   in ``wanted``, the last value of each; ``end``: the head's size; ``upgrade``: the
 *   request upgrades (an Upgrade header and the "upgrade" token), the bytes after the
 *   head are then the WebSocket's. A head that does not upgrade must end ``data``.
 *   Anything else is None: HeadReader reads it with llhttp.
 * - parse_event(body: bytes, max_payload: int, max_recipients: int)
 *       -> (event_id, user, session, location, payload, digested, hash) | None
 *   The common SP event request, as orbited.node.events.parse_request reads it: a JSON
 *   object of exactly "id", "to" and "data" (and "hash"), each once; the id and the one
 *   recipient's three parts strings of printable ASCII without escapes (the id 1 to
 *   MAX_EVENT_ID long, the user 1 to 64, session and location up to 64, no part "*");
 *   "hash" a positive integer. ``payload``: the data as the node keeps it (compact JSON,
 *   as json.dumps writes it with separators (",", ":") and ensure_ascii=False), read
 *   from the body with its blanks dropped, where the data is already written that way
 *   otherwise: strings without escapes or control characters (valid UTF-8), integers of
 *   at most 18 digits (no "-0"), floats as Python's repr writes them, no name twice in an
 *   object, at most 64 levels deep; at most ``max_payload`` bytes. ``digested``: what the
 *   request's digest hashes (the id and recipients as JSON, a NUL, the payload). Anything
 *   else is None: parse_request reads it, and words every refusal.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_API_COMPAT 0x10101000L /* SHA256_Init and friends: deprecated in 3.0, kept */
#include <Python.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* orbited.core.tokens and orbited.core.keys: the same limits (tests compare them). */
#define MAX_TOKEN_CHARS 4096
#define MAX_PART_BYTES 256
#define MAX_NUMERIC_DATE 9007199254740991LL /* 2**53 - 1 */
#define BLOCK 64                            /* SHA-256's block size */
#define MAC 32                              /* SHA-256's digest size */
#define ENCODED_MAC 43                      /* its base64url, unpadded */

static const char URLSAFE[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
static signed char VALUE[256]; /* each base64url character's 6-bit value, -1 if none */

typedef struct {
    PyObject_HEAD
    SHA256_CTX inner; /* after the block of key xor ipad */
    SHA256_CTX outer; /* after the block of key xor opad */
} KeyObject;

static int
Key_init(KeyObject *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"secret", NULL};
    Py_buffer secret;
    unsigned char key[BLOCK], pad[BLOCK];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*:Key", names, &secret)) {
        return -1;
    }
    memset(key, 0, BLOCK);
    if (secret.len > BLOCK) {
        SHA256(secret.buf, (size_t)secret.len, key);
    }
    else {
        memcpy(key, secret.buf, (size_t)secret.len);
    }
    PyBuffer_Release(&secret);
    for (int i = 0; i < BLOCK; i++) {
        pad[i] = key[i] ^ 0x36;
    }
    SHA256_Init(&self->inner);
    SHA256_Update(&self->inner, pad, BLOCK);
    for (int i = 0; i < BLOCK; i++) {
        pad[i] = key[i] ^ 0x5C;
    }
    SHA256_Init(&self->outer);
    SHA256_Update(&self->outer, pad, BLOCK);
    OPENSSL_cleanse(key, BLOCK);
    OPENSSL_cleanse(pad, BLOCK);
    return 0;
}

static void
Key_dealloc(KeyObject *self)
{
    OPENSSL_cleanse(&self->inner, sizeof self->inner);
    OPENSSL_cleanse(&self->outer, sizeof self->outer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* HMAC-SHA256 of data under the key. */
static void
mac_of(const KeyObject *self, const unsigned char *data, size_t size, unsigned char *out)
{
    SHA256_CTX ctx = self->inner;
    unsigned char digest[MAC];
    SHA256_Update(&ctx, data, size);
    SHA256_Final(digest, &ctx);
    ctx = self->outer;
    SHA256_Update(&ctx, digest, MAC);
    SHA256_Final(out, &ctx);
}

/* The 32-byte MAC's base64url without padding: 43 characters. */
static void
encode_mac(const unsigned char *mac, unsigned char *out)
{
    int o = 0, i = 0;
    for (; i + 3 <= MAC; i += 3) {
        unsigned v = (unsigned)mac[i] << 16 | (unsigned)mac[i + 1] << 8 | mac[i + 2];
        out[o++] = URLSAFE[v >> 18 & 63];
        out[o++] = URLSAFE[v >> 12 & 63];
        out[o++] = URLSAFE[v >> 6 & 63];
        out[o++] = URLSAFE[v & 63];
    }
    /* 32 = 30 + 2: the last two bytes are three characters */
    unsigned v = (unsigned)mac[i] << 16 | (unsigned)mac[i + 1] << 8;
    out[o++] = URLSAFE[v >> 18 & 63];
    out[o++] = URLSAFE[v >> 12 & 63];
    out[o++] = URLSAFE[v >> 6 & 63];
}

/* A base64url segment without padding, decoded into out; its size, or -1 where
 * orbited.core.tokens._segment would not give the same bytes without doubt: a character
 * outside the alphabet (padding included), a length of 1 mod 4, stray bits in the last
 * character (a non-canonical encoding). */
static Py_ssize_t
decode_segment(const unsigned char *s, Py_ssize_t n, unsigned char *out)
{
    Py_ssize_t o = 0, i = 0;
    if (n % 4 == 1) {
        return -1;
    }
    for (; i + 4 <= n; i += 4) {
        int a = VALUE[s[i]], b = VALUE[s[i + 1]], c = VALUE[s[i + 2]], d = VALUE[s[i + 3]];
        if ((a | b | c | d) < 0) {
            return -1;
        }
        out[o++] = (unsigned char)(a << 2 | b >> 4);
        out[o++] = (unsigned char)((b & 15) << 4 | c >> 2);
        out[o++] = (unsigned char)((c & 3) << 6 | d);
    }
    if (n - i == 2) {
        int a = VALUE[s[i]], b = VALUE[s[i + 1]];
        if ((a | b) < 0 || b & 15) {
            return -1;
        }
        out[o++] = (unsigned char)(a << 2 | b >> 4);
    }
    else if (n - i == 3) {
        int a = VALUE[s[i]], b = VALUE[s[i + 1]], c = VALUE[s[i + 2]];
        if ((a | b | c) < 0 || c & 3) {
            return -1;
        }
        out[o++] = (unsigned char)(a << 2 | b >> 4);
        out[o++] = (unsigned char)((b & 15) << 4 | c >> 2);
    }
    return o;
}

enum { SUB, SID, LOC, AUD, EXP, IAT, CLAIMS };

/* Which claim a member's name (between its quotes) is, or -1. */
static int
claim_of(const unsigned char *name, Py_ssize_t n)
{
    if (n != 3) {
        return -1;
    }
    static const char *names[CLAIMS] = {"sub", "sid", "loc", "aud", "exp", "iat"};
    for (int c = 0; c < CLAIMS; c++) {
        if (memcmp(name, names[c], 3) == 0) {
            return c;
        }
    }
    return -1;
}

typedef struct {
    const unsigned char *text[CLAIMS]; /* a string claim's characters (between its quotes) */
    Py_ssize_t size[CLAIMS];
    long long number[CLAIMS];          /* an integer claim's value */
    int seen[CLAIMS];
} Claims;

/* Compact JSON of the common claims, read into c: 0, or -1 for anything else. */
static int
read_claims(const unsigned char *p, Py_ssize_t n, Claims *c)
{
    const unsigned char *end = p + n;
    memset(c, 0, sizeof *c);
    if (n < 2 || *p++ != '{' || end[-1] != '}') {
        return -1;
    }
    end--; /* the closing brace */
    while (p < end) {
        if (*p++ != '"' || end - p < 5) { /* name":x at least */
            return -1;
        }
        const unsigned char *name = p;
        while (p < end && *p != '"') {
            p++;
        }
        int claim = claim_of(name, p - name);
        if (claim < 0 || c->seen[claim] || end - p < 3 || p[1] != ':') {
            return -1;
        }
        c->seen[claim] = 1;
        p += 2;
        if (claim <= AUD) { /* a string of printable ASCII: no escape, no quote inside */
            if (*p++ != '"') {
                return -1;
            }
            const unsigned char *text = p;
            while (p < end && *p != '"') {
                if (*p < 0x20 || *p > 0x7E || *p == '\\') {
                    return -1;
                }
                p++;
            }
            if (p == end) {
                return -1;
            }
            c->text[claim] = text;
            c->size[claim] = p - text;
            p++; /* the closing quote */
        }
        else { /* an integer: 0, or up to 16 digits not starting with 0 */
            const unsigned char *digits = p;
            long long value = 0;
            while (p < end && *p >= '0' && *p <= '9') {
                value = value * 10 + (*p - '0');
                p++;
            }
            Py_ssize_t count = p - digits;
            if (count == 0 || count > 16 || (count > 1 && *digits == '0')) {
                return -1;
            }
            c->number[claim] = value;
        }
        if (p < end && *p++ != ',') {
            return -1;
        }
        if (p == end && p[-1] == ',') { /* a trailing comma */
            return -1;
        }
    }
    return 0;
}

static int
is_wildcard(const Claims *c, int claim)
{
    return c->seen[claim] && c->size[claim] == 1 && c->text[claim][0] == '*';
}

static PyObject *
text_of(const Claims *c, int claim)
{
    if (!c->seen[claim]) {
        return PyUnicode_FromStringAndSize("", 0);
    }
    return PyUnicode_FromStringAndSize((const char *)c->text[claim], c->size[claim]);
}

static PyObject *
Key_claims(KeyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyUnicode_Check(args[0]) || !PyAnySet_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "claims(token: str, known: set, now, leeway)");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[2]);
    if (now == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    double leeway = PyFloat_AsDouble(args[3]);
    if (leeway == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *token = args[0];
    if (PyUnicode_READY(token) < 0) {
        return NULL;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(token);
    if (!PyUnicode_IS_ASCII(token) || n == 0 || n > MAX_TOKEN_CHARS) {
        Py_RETURN_NONE;
    }
    const unsigned char *t = PyUnicode_1BYTE_DATA(token);
    const unsigned char *first = memchr(t, '.', (size_t)n);
    const unsigned char *last = t + n - 1;
    while (last > t && *last != '.') {
        last--;
    }
    if (first == NULL || first == last) {
        Py_RETURN_NONE;
    }
    /* header segment t..first, payload first+1..last, signature last+1..end */
    if (t + n - (last + 1) != ENCODED_MAC) {
        Py_RETURN_NONE;
    }
    PyObject *header = PyBytes_FromStringAndSize((const char *)t, first - t);
    if (header == NULL) {
        return NULL;
    }
    int known = PySet_Contains(args[1], header);
    Py_DECREF(header);
    if (known <= 0) {
        return known < 0 ? NULL : Py_NewRef(Py_None);
    }
    unsigned char mac[MAC], encoded[ENCODED_MAC];
    mac_of(self, t, (size_t)(last - t), mac);
    encode_mac(mac, encoded);
    if (CRYPTO_memcmp(encoded, last + 1, ENCODED_MAC) != 0) {
        Py_RETURN_NONE;
    }
    unsigned char payload[MAX_TOKEN_CHARS];
    Py_ssize_t size = decode_segment(first + 1, last - first - 1, payload);
    Claims c;
    if (size < 0 || read_claims(payload, size, &c) < 0) {
        Py_RETURN_NONE;
    }
    long long exp = c.number[EXP], iat = c.seen[IAT] ? c.number[IAT] : 0;
    if (!c.seen[SUB] || !c.seen[EXP] || !c.seen[AUD] || c.size[AUD] != 7 ||
        memcmp(c.text[AUD], "orbited", 7) != 0 || c.size[SUB] == 0 ||
        c.size[SUB] > MAX_PART_BYTES || c.size[SID] > MAX_PART_BYTES ||
        c.size[LOC] > MAX_PART_BYTES || iat > MAX_NUMERIC_DATE || exp > MAX_NUMERIC_DATE ||
        !((double)iat <= now + leeway) || !((double)exp + leeway >= now) ||
        is_wildcard(&c, SUB) || is_wildcard(&c, SID) || is_wildcard(&c, LOC)) {
        Py_RETURN_NONE;
    }
    PyObject *sub = text_of(&c, SUB), *sid = text_of(&c, SID), *loc = text_of(&c, LOC);
    PyObject *result = NULL;
    if (sub != NULL && sid != NULL && loc != NULL) {
        result = Py_BuildValue("(OOOd)", sub, sid, loc, (double)exp);
    }
    Py_XDECREF(sub);
    Py_XDECREF(sid);
    Py_XDECREF(loc);
    return result;
}

/* hashing.route_of_user's twin: an ASCII user (UTF-8 is then the same bytes) only. */
static PyObject *
route_of_user(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "route_of_user(user: str, routes: int)");
        return NULL;
    }
    int overflow = 0;
    long long routes = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (routes == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *user = args[0];
    if (overflow || routes < 1 || PyUnicode_READY(user) < 0 || !PyUnicode_IS_ASCII(user) ||
        PyUnicode_GET_LENGTH(user) > 0xFFFFFFFFLL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(user);
    unsigned char size[4] = {(unsigned char)(n >> 24), (unsigned char)(n >> 16),
                             (unsigned char)(n >> 8), (unsigned char)n};
    unsigned char digest[SHA256_DIGEST_LENGTH];
    SHA256_CTX ctx;
    SHA256_Init(&ctx);
    SHA256_Update(&ctx, size, 4);
    SHA256_Update(&ctx, PyUnicode_1BYTE_DATA(user), (size_t)n);
    SHA256_Final(digest, &ctx);
    unsigned long long head = 0;
    for (int i = 0; i < 8; i++) {
        head = head << 8 | digest[i];
    }
    return PyLong_FromUnsignedLongLong(head % (unsigned long long)routes + 1);
}

static const unsigned char GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
static const char BASE64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* wsframe.accept_key's twin: base64 (padded) of SHA-1(key + GUID). */
static PyObject *
accept_key(PyObject *module, PyObject *arg)
{
    (void)module;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "accept_key(key: bytes)");
        return NULL;
    }
    unsigned char digest[SHA_DIGEST_LENGTH]; /* 20 bytes: 28 characters with one '=' */
    char out[28];
    SHA_CTX ctx;
    SHA1_Init(&ctx);
    SHA1_Update(&ctx, PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg));
    SHA1_Update(&ctx, GUID, sizeof GUID - 1);
    SHA1_Final(digest, &ctx);
    int o = 0, i = 0;
    for (; i + 3 <= SHA_DIGEST_LENGTH; i += 3) {
        unsigned v = (unsigned)digest[i] << 16 | (unsigned)digest[i + 1] << 8 | digest[i + 2];
        out[o++] = BASE64[v >> 18 & 63];
        out[o++] = BASE64[v >> 12 & 63];
        out[o++] = BASE64[v >> 6 & 63];
        out[o++] = BASE64[v & 63];
    }
    unsigned v = (unsigned)digest[i] << 16 | (unsigned)digest[i + 1] << 8; /* 20 = 18 + 2 */
    out[o++] = BASE64[v >> 18 & 63];
    out[o++] = BASE64[v >> 12 & 63];
    out[o++] = BASE64[v >> 6 & 63];
    out[o++] = '=';
    return PyBytes_FromStringAndSize(out, o);
}

/* RFC 9110's tchar: the bytes of a header name. */
static int
is_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static int
same_lower(const unsigned char *p, Py_ssize_t n, const char *lower)
{
    Py_ssize_t i = 0;
    for (; i < n && lower[i]; i++) {
        unsigned char c = p[i];
        if ((c >= 'A' && c <= 'Z' ? c + 32 : c) != (unsigned char)lower[i]) {
            return 0;
        }
    }
    return i == n && lower[i] == 0;
}

/* A Connection value: 1 if it lists "upgrade", 0 if not, -1 if it lists anything but
 * "keep-alive" and "upgrade" (llhttp reads "close" and others: HeadReader decides). */
static int
connection_upgrades(const unsigned char *v, Py_ssize_t n)
{
    int upgrade = 0;
    Py_ssize_t i = 0;
    while (i <= n) {
        Py_ssize_t start = i;
        while (i < n && v[i] != ',') {
            i++;
        }
        Py_ssize_t a = start, b = i;
        while (a < b && (v[a] == ' ' || v[a] == '\t')) {
            a++;
        }
        while (b > a && (v[b - 1] == ' ' || v[b - 1] == '\t')) {
            b--;
        }
        if (same_lower(v + a, b - a, "upgrade")) {
            upgrade = 1;
        }
        else if (!same_lower(v + a, b - a, "keep-alive")) {
            return -1;
        }
        i++; /* past the comma (or the end) */
    }
    return upgrade;
}

#define MAX_NAME 64 /* a longer header name is not one the front reads: not looked up */

static PyObject *
read_get_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyAnySet_Check(args[1]) ||
        !PyLong_Check(args[2]) || !PyLong_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "read_get_head(data: bytes, wanted: frozenset, max_headers, small)");
        return NULL;
    }
    Py_ssize_t max_headers = PyLong_AsSsize_t(args[2]), small = PyLong_AsSsize_t(args[3]);
    if ((max_headers == -1 || small == -1) && PyErr_Occurred()) {
        return NULL;
    }
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]), i = 4;
    if (n < 16 || memcmp(d, "GET /", 5) != 0) {
        Py_RETURN_NONE;
    }
    while (i < n && d[i] > 0x20 && d[i] < 0x7F && d[i] != '#') {
        i++;
    }
    Py_ssize_t url_end = i;
    if (n - i < 11 || memcmp(d + i, " HTTP/1.1\r\n", 11) != 0) {
        Py_RETURN_NONE;
    }
    i += 11;
    PyObject *headers = PyDict_New();
    if (headers == NULL) {
        return NULL;
    }
    Py_ssize_t count = 0;
    int connection = -2, upgrade_header = 0; /* -2: no Connection header */
    for (;;) {
        if (i + 1 < n && d[i] == '\r' && d[i + 1] == '\n') {
            i += 2;
            break; /* the blank line: the head is whole */
        }
        Py_ssize_t name = i;
        while (i < n && is_tchar(d[i])) {
            i++;
        }
        Py_ssize_t name_size = i - name;
        if (name_size == 0 || i >= n || d[i] != ':') {
            goto other;
        }
        i++;
        while (i < n && (d[i] == ' ' || d[i] == '\t')) {
            i++;
        }
        Py_ssize_t value = i;
        while (i < n && ((d[i] > 0x20 && d[i] < 0x7F) || d[i] == ' ' || d[i] == '\t')) {
            i++;
        }
        Py_ssize_t value_size = i - value;
        if (value_size == 0 || d[i - 1] == ' ' || d[i - 1] == '\t' || i + 1 >= n ||
            d[i] != '\r' || d[i + 1] != '\n' || ++count > max_headers) {
            goto other;
        }
        i += 2;
        const unsigned char *nm = d + name, *v = d + value;
        if (same_lower(nm, name_size, "content-length") ||
            same_lower(nm, name_size, "transfer-encoding") ||
            same_lower(nm, name_size, "proxy-connection")) {
            goto other;
        }
        if (same_lower(nm, name_size, "connection")) {
            if (connection != -2 || (connection = connection_upgrades(v, value_size)) < 0) {
                goto other;
            }
        }
        else if (same_lower(nm, name_size, "upgrade")) {
            if (upgrade_header++) {
                goto other;
            }
        }
        if (name_size > MAX_NAME) {
            continue;
        }
        char lower[MAX_NAME];
        for (Py_ssize_t k = 0; k < name_size; k++) {
            lower[k] = (char)(nm[k] >= 'A' && nm[k] <= 'Z' ? nm[k] + 32 : nm[k]);
        }
        PyObject *key = PyBytes_FromStringAndSize(lower, name_size);
        if (key == NULL) {
            goto error;
        }
        int wanted = PySet_Contains(args[1], key);
        if (wanted > 0) {
            PyObject *text = PyBytes_FromStringAndSize((const char *)v, value_size);
            wanted = text == NULL ? -1 : PyDict_SetItem(headers, key, text);
            Py_XDECREF(text);
        }
        Py_DECREF(key);
        if (wanted < 0) {
            goto error;
        }
    }
    int upgrade = upgrade_header && connection == 1;
    if (i > small || (!upgrade && i != n)) {
        goto other;
    }
    PyObject *url = PyBytes_FromStringAndSize((const char *)d + 4, url_end - 4);
    if (url == NULL) {
        goto error;
    }
    return Py_BuildValue("(NNnO)", url, headers, i, upgrade ? Py_True : Py_False);
other:
    Py_DECREF(headers);
    Py_RETURN_NONE;
error:
    Py_DECREF(headers);
    return NULL;
}

/* -- the common event request ------------------------------------------------------ */

#define MAX_EVENT_ID 128 /* orbited.node.events.MAX_EVENT_ID */
#define MAX_KEY_PART 64  /* parse_recipient's fast path */
#define MAX_DEPTH 64
#define MAX_NAMES 64     /* names per object checked for repeats */

typedef struct {
    const unsigned char *p, *end;
    unsigned char *out; /* the payload written so far */
    Py_ssize_t size;
} Reader;

static void
skip_blanks(Reader *r)
{
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r')) {
        r->p++;
    }
}

/* The length of one valid UTF-8 sequence at p (a non-ASCII lead byte), else 0. */
static int
utf8_length(const unsigned char *p, const unsigned char *end)
{
    unsigned char c = p[0];
    int n;
    unsigned min;
    unsigned cp;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2, min = 0x80, cp = c & 0x1F;
    }
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3, min = 0x800, cp = c & 0x0F;
    }
    else if (c >= 0xF0 && c <= 0xF4) {
        n = 4, min = 0x10000, cp = c & 0x07;
    }
    else {
        return 0;
    }
    if (end - p < n) {
        return 0;
    }
    for (int i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80) {
            return 0;
        }
        cp = cp << 6 | (p[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
        return 0;
    }
    return n;
}

/* A string at r->p (its opening quote) written as json.dumps writes it: copied when it
 * has no escape and no control character; its characters' start and size in *text. */
static int
copy_string(Reader *r, const unsigned char **text, Py_ssize_t *size)
{
    const unsigned char *start = ++r->p;
    while (r->p < r->end && *r->p != '"') {
        unsigned char c = *r->p;
        if (c < 0x20 || c == '\\') {
            return -1;
        }
        if (c >= 0x80) {
            int n = utf8_length(r->p, r->end);
            if (n == 0) {
                return -1;
            }
            r->p += n;
        }
        else {
            r->p++;
        }
    }
    if (r->p == r->end) {
        return -1;
    }
    *text = start;
    *size = r->p - start;
    r->out[r->size++] = '"';
    memcpy(r->out + r->size, start, (size_t)*size);
    r->size += *size;
    r->out[r->size++] = '"';
    r->p++; /* the closing quote */
    return 0;
}

/* Powers of ten a double holds exactly (10**22 is the last one). */
static const double EXACT_TEN[] = {
    1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};

/* Is ``text`` (a JSON number with a fraction) written as Python's repr writes its float?
 * 1 yes, 0 no, -1 undecided (then copy_number formats the float back, ~0.5 µs; this
 * answers the common shape, a plain decimal such as a time.time() stamp, in ~20 ns).
 *
 * Decided here: "[-]I.F" without an exponent, F ending in a nonzero digit, where repr
 * writes positional notation (an integer part of at most 16 digits, or "0." and at most
 * 3 zeros before the first significant digit) and the significant digits M (at most
 * 2**53 - 1) over 10**len(F) (at most 10**20) are two doubles held exactly, so their
 * quotient d is the correctly rounded value float() reads. repr writes the shortest
 * digits that read back as d, and of those the nearest to d. So the text is d's repr
 * when:
 * - no decimal of fewer digits reads as d: those lie on the grid one digit coarser, whose
 *   points either side of the text are the text cut by its last digit and that plus one
 *   unit; any other lies beyond one of them, and the decimals that read as d are an
 *   interval. If one does, the repr is shorter and the answer is no;
 * - no other decimal of as many digits reads as d (the neighbours M - 1 and M + 1, by
 *   the same interval argument): then the text is the only candidate of its length. If
 *   a neighbour does, repr chooses by distance, which is left undecided.
 * With at most 15 significant digits the first condition always holds and the second
 * too: two decimals of 15 digits never read as one double in the normal range (DBL_DIG),
 * so those are yes at once. The quotients are IEEE divisions, each correctly rounded as
 * float() is (where FLT_EVAL_METHOD is 0: SSE2 on x86-64, AArch64; otherwise undecided).
 * tests/core/test_speedups.py compares this with repr on 200 000 generated numbers. */
static int
decimal_is_repr(const unsigned char *text, Py_ssize_t n)
{
#if FLT_EVAL_METHOD != 0 /* x87's wider registers: a quotient is not rounded to a double */
    return -1;
#endif
    const unsigned char *p = text, *end = text + n;
    if (*p == '-') {
        p++;
    }
    uint64_t m = 0;
    int digits = 0, fraction = 0, zeros = 0;
    for (; p < end && *p != '.'; p++) { /* the integer part */
        if (*p < '0' || *p > '9') {
            return -1;
        }
        m = m * 10 + (uint64_t)(*p - '0');
        if (m) {
            digits++;
        }
    }
    if (p == end) {
        return -1;
    }
    for (p++; p < end; p++) { /* the fraction */
        if (*p < '0' || *p > '9' || digits >= 17) {
            return -1;
        }
        fraction++;
        m = m * 10 + (uint64_t)(*p - '0');
        if (m) {
            digits++;
        }
        else {
            zeros++; /* after "0.": zeros before the first significant digit */
        }
    }
    /* At most 17 significant digits, and a fraction: an integer part of at most 16 digits
     * and a fraction of at most 3 + 17 (its leading zeros, then its digits), so the
     * positional notation and 10**len(F) are within reach once these hold. */
    if (m == 0 || end[-1] == '0' || zeros > 3 || m > 9007199254740991ULL) {
        return -1; /* zero, an integer-valued float, exponent notation, not exact */
    }
    if (digits <= 15) {
        return 1;
    }
    double d = (double)m / EXACT_TEN[fraction];
    uint64_t cut = m / 10;
    double shorter = EXACT_TEN[fraction - 1];
    if ((double)cut / shorter == d || (double)(cut + 1) / shorter == d) {
        return 0;
    }
    if ((double)(m - 1) / EXACT_TEN[fraction] == d || (double)(m + 1) / EXACT_TEN[fraction] == d) {
        return -1;
    }
    return 1;
}

/* A number written as json.dumps writes what json.loads reads from it. */
static int
copy_number(Reader *r)
{
    const unsigned char *start = r->p, *p = r->p, *end = r->end;
    int fraction = 0;
    if (p < end && *p == '-') {
        p++;
    }
    if (p < end && *p == '0') {
        p++;
    }
    else if (p < end && *p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
    }
    else {
        return -1;
    }
    if (p < end && *p == '.') {
        fraction = 1;
        const unsigned char *digits = ++p;
        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
        if (p == digits) {
            return -1;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        fraction = 1;
        p++;
        if (p < end && (*p == '+' || *p == '-')) {
            p++;
        }
        const unsigned char *digits = p;
        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
        if (p == digits) {
            return -1;
        }
    }
    Py_ssize_t n = p - start;
    int repr;
    if (!fraction) { /* an integer: its own text, unless "-0" or past 18 digits */
        if (n > 18 + (*start == '-') || (n == 2 && start[0] == '-' && start[1] == '0')) {
            return -1;
        }
    }
    else if ((repr = decimal_is_repr(start, n)) == 0) { /* a float: its text must be its repr */
        return -1;
    }
    else if (repr < 0) { /* undecided: format it back */
        char text[64];
        if (n >= (Py_ssize_t)sizeof text) {
            return -1;
        }
        memcpy(text, start, (size_t)n);
        text[n] = 0;
        char *stop = NULL;
        double value = PyOS_string_to_double(text, &stop, NULL);
        if (value == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
        if (stop != text + n || !isfinite(value)) {
            return -1;
        }
        char *written = PyOS_double_to_string(value, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (written == NULL) {
            PyErr_Clear();
            return -1;
        }
        int same = strcmp(written, text) == 0;
        PyMem_Free(written);
        if (!same) {
            return -1;
        }
    }
    memcpy(r->out + r->size, start, (size_t)n);
    r->size += n;
    r->p = p;
    return 0;
}

static int copy_value(Reader *r, int depth);

/* A container's opening character written and passed: 1 if it closes at once (then
 * written and passed too), else 0. */
static int
open_container(Reader *r, unsigned char close)
{
    r->out[r->size++] = *r->p++;
    skip_blanks(r);
    if (r->p < r->end && *r->p == close) {
        r->out[r->size++] = close;
        r->p++;
        return 1;
    }
    return 0;
}

/* After a member: 1 at the container's close (written and passed), 0 after a comma
 * (written; the blanks after it passed), -1 for anything else. */
static int
after_member(Reader *r, unsigned char close)
{
    skip_blanks(r);
    if (r->p == r->end) {
        return -1;
    }
    unsigned char c = *r->p++;
    if (c != close && c != ',') {
        return -1;
    }
    r->out[r->size++] = c;
    if (c == ',') {
        skip_blanks(r);
    }
    return c == close;
}

static int
copy_object(Reader *r, int depth)
{
    const unsigned char *names[MAX_NAMES];
    Py_ssize_t sizes[MAX_NAMES];
    int count = 0;
    if (open_container(r, '}')) {
        return 0;
    }
    for (;;) {
        const unsigned char *name;
        Py_ssize_t size;
        if (r->p == r->end || *r->p != '"' || count == MAX_NAMES ||
            copy_string(r, &name, &size) < 0) {
            return -1;
        }
        for (int i = 0; i < count; i++) {
            if (sizes[i] == size && memcmp(names[i], name, (size_t)size) == 0) {
                return -1; /* a name twice: json keeps the last, so its text differs */
            }
        }
        names[count] = name;
        sizes[count++] = size;
        skip_blanks(r);
        if (r->p == r->end || *r->p++ != ':') {
            return -1;
        }
        r->out[r->size++] = ':';
        skip_blanks(r);
        int closed = copy_value(r, depth + 1) < 0 ? -1 : after_member(r, '}');
        if (closed != 0) {
            return closed < 0 ? -1 : 0;
        }
    }
}

static int
copy_array(Reader *r, int depth)
{
    if (open_container(r, ']')) {
        return 0;
    }
    for (;;) {
        int closed = copy_value(r, depth + 1) < 0 ? -1 : after_member(r, ']');
        if (closed != 0) {
            return closed < 0 ? -1 : 0;
        }
    }
}

static int
copy_literal(Reader *r, const char *word, Py_ssize_t n)
{
    if (r->end - r->p < n || memcmp(r->p, word, (size_t)n) != 0) {
        return -1;
    }
    memcpy(r->out + r->size, word, (size_t)n);
    r->size += n;
    r->p += n;
    return 0;
}

static int
copy_value(Reader *r, int depth)
{
    if (depth > MAX_DEPTH || r->p == r->end) {
        return -1;
    }
    const unsigned char *text;
    Py_ssize_t size;
    switch (*r->p) {
    case '{':
        return copy_object(r, depth);
    case '[':
        return copy_array(r, depth);
    case '"':
        return copy_string(r, &text, &size);
    case 't':
        return copy_literal(r, "true", 4);
    case 'f':
        return copy_literal(r, "false", 5);
    case 'n':
        return copy_literal(r, "null", 4);
    default:
        return copy_number(r);
    }
}

/* A string of printable ASCII, no quote or backslash, of min..max characters. */
static int
read_plain(Reader *r, Py_ssize_t min, Py_ssize_t max, const unsigned char **text,
           Py_ssize_t *size)
{
    if (r->p == r->end || *r->p != '"') {
        return -1;
    }
    const unsigned char *start = ++r->p;
    while (r->p < r->end && *r->p != '"') {
        if (*r->p < 0x20 || *r->p > 0x7E || *r->p == '\\') {
            return -1;
        }
        r->p++;
    }
    if (r->p == r->end || r->p - start < min || r->p - start > max) {
        return -1;
    }
    *text = start;
    *size = r->p - start;
    r->p++;
    return 0;
}

static int
expect(Reader *r, unsigned char c)
{
    skip_blanks(r);
    if (r->p == r->end || *r->p != c) {
        return -1;
    }
    r->p++;
    skip_blanks(r);
    return 0;
}

enum { FIELD_ID, FIELD_TO, FIELD_DATA, FIELD_HASH, FIELDS };

static PyObject *
parse_event(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3 || !PyBytes_Check(args[0]) || !PyLong_Check(args[1]) ||
        !PyLong_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "parse_event(body: bytes, max_payload: int, max_recipients: int)");
        return NULL;
    }
    Py_ssize_t max_payload = PyLong_AsSsize_t(args[1]);
    Py_ssize_t max_recipients = PyLong_AsSsize_t(args[2]);
    if ((max_payload == -1 || max_recipients == -1) && PyErr_Occurred()) {
        return NULL;
    }
    const unsigned char *body = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    if (max_recipients < 1 || n < 2) {
        Py_RETURN_NONE;
    }
    unsigned char *out = PyMem_Malloc((size_t)n);
    if (out == NULL) {
        return PyErr_NoMemory();
    }
    Reader r = {body, body + n, out, 0};
    const unsigned char *id = NULL, *parts[3] = {NULL, NULL, NULL};
    Py_ssize_t id_size = 0, part_sizes[3] = {0, 0, 0};
    Py_ssize_t data_start = -1, data_end = -1;
    long long hash = 0;
    int seen[FIELDS] = {0, 0, 0, 0};
    PyObject *result = NULL;
    if (expect(&r, '{') < 0) {
        goto done;
    }
    for (;;) {
        const unsigned char *name;
        Py_ssize_t size;
        if (read_plain(&r, 1, 4, &name, &size) < 0 || expect(&r, ':') < 0) {
            goto done;
        }
        int field = size == 2 && memcmp(name, "id", 2) == 0     ? FIELD_ID
                    : size == 2 && memcmp(name, "to", 2) == 0   ? FIELD_TO
                    : size == 4 && memcmp(name, "data", 4) == 0 ? FIELD_DATA
                    : size == 4 && memcmp(name, "hash", 4) == 0 ? FIELD_HASH
                                                                : -1;
        if (field < 0 || seen[field]++) {
            goto done;
        }
        if (field == FIELD_ID) {
            if (read_plain(&r, 1, MAX_EVENT_ID, &id, &id_size) < 0) {
                goto done;
            }
        }
        else if (field == FIELD_TO) { /* [[user, session, location]] */
            if (expect(&r, '[') < 0 || r.p == r.end || *r.p != '[') {
                goto done;
            }
            r.p++;
            for (int i = 0; i < 3; i++) {
                skip_blanks(&r);
                if (read_plain(&r, i == 0 ? 1 : 0, MAX_KEY_PART, &parts[i], &part_sizes[i]) < 0 ||
                    (part_sizes[i] == 1 && parts[i][0] == '*') ||
                    expect(&r, i < 2 ? ',' : ']') < 0) {
                    goto done;
                }
            }
            if (r.p == r.end || *r.p != ']') {
                goto done;
            }
            r.p++;
        }
        else if (field == FIELD_DATA) {
            data_start = r.size;
            if (copy_value(&r, 0) < 0) {
                goto done;
            }
            data_end = r.size;
        }
        else { /* hash: a positive integer of at most 18 digits */
            const unsigned char *digits = r.p;
            while (r.p < r.end && *r.p >= '0' && *r.p <= '9') {
                if (r.p - digits < 18) { /* (more digits: refused below) */
                    hash = hash * 10 + (*r.p - '0');
                }
                r.p++;
            }
            if (r.p == digits || r.p - digits > 18 || *digits == '0') {
                goto done;
            }
            if (r.p < r.end && (*r.p == '.' || *r.p == 'e' || *r.p == 'E')) {
                goto done;
            }
        }
        skip_blanks(&r);
        if (r.p == r.end) {
            goto done;
        }
        if (*r.p == '}') {
            r.p++;
            break;
        }
        if (*r.p++ != ',') {
            goto done;
        }
        skip_blanks(&r);
    }
    skip_blanks(&r);
    if (r.p != r.end || !seen[FIELD_ID] || !seen[FIELD_TO] || !seen[FIELD_DATA] ||
        data_end - data_start > max_payload) {
        goto done;
    }
    {
        /* ["id",[["user","session","location"]]] NUL payload */
        Py_ssize_t payload_size = data_end - data_start;
        Py_ssize_t addressed = 2 + id_size + 1 + 3 + part_sizes[0] + part_sizes[1] +
                               part_sizes[2] + 6 + 2 + 3;
        PyObject *digested = PyBytes_FromStringAndSize(NULL, addressed + 1 + payload_size);
        if (digested == NULL) {
            goto done;
        }
        char *d = PyBytes_AS_STRING(digested);
        Py_ssize_t k = 0;
        d[k++] = '[';
        d[k++] = '"';
        memcpy(d + k, id, (size_t)id_size);
        k += id_size;
        memcpy(d + k, "\",[[", 4);
        k += 4;
        for (int i = 0; i < 3; i++) {
            d[k++] = '"';
            memcpy(d + k, parts[i], (size_t)part_sizes[i]);
            k += part_sizes[i];
            d[k++] = '"';
            if (i < 2) {
                d[k++] = ',';
            }
        }
        memcpy(d + k, "]]]", 3);
        k += 3;
        d[k++] = 0;
        memcpy(d + k, out + data_start, (size_t)payload_size);
        k += payload_size;
        if (k != PyBytes_GET_SIZE(digested)) { /* the sizes above are the layout's */
            Py_DECREF(digested);
            PyErr_SetString(PyExc_SystemError, "parse_event: digest input size");
            goto done;
        }
        PyObject *hash_value = seen[FIELD_HASH] ? PyLong_FromLongLong(hash) : Py_NewRef(Py_None);
        if (hash_value == NULL) {
            Py_DECREF(digested);
            goto done;
        }
        /* (N: the tuple takes both references, and drops them if it cannot be built) */
        result = Py_BuildValue("(s#s#s#s#y#NN)", (const char *)id, id_size,
                               (const char *)parts[0], part_sizes[0], (const char *)parts[1],
                               part_sizes[1], (const char *)parts[2], part_sizes[2],
                               (const char *)(out + data_start), payload_size, digested,
                               hash_value);
    }
done:
    PyMem_Free(out);
    if (result == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return result;
}

static PyMethodDef module_functions[] = {
    {"parse_event", (PyCFunction)(void (*)(void))parse_event, METH_FASTCALL,
     "parse_event(body, max_payload, max_recipients): the common event request, else None."},
    {"read_get_head", (PyCFunction)(void (*)(void))read_get_head, METH_FASTCALL,
     "read_get_head(data, wanted, max_headers, small): the common GET head, else None."},
    {"route_of_user", (PyCFunction)(void (*)(void))route_of_user, METH_FASTCALL,
     "route_of_user(user, routes): the version 2 route of an ASCII user, else None."},
    {"accept_key", (PyCFunction)accept_key, METH_O,
     "accept_key(key): the Sec-WebSocket-Accept value of a Sec-WebSocket-Key."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef Key_methods[] = {
    {"claims", (PyCFunction)(void (*)(void))Key_claims, METH_FASTCALL,
     "claims(token, known, now, leeway): (sub, sid, loc, exp) of the common token that "
     "passes every check, else None (the Python check decides)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject KeyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "orbited.core._speedups.Key",
    .tp_doc = "Key(secret): HMAC-SHA256 keyed once for the common token's check.",
    .tp_basicsize = sizeof(KeyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Key_init,
    .tp_dealloc = (destructor)Key_dealloc,
    .tp_methods = Key_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "orbited.core._speedups",
    "C twins of the pure functions the node's hot paths spend most on.", -1,
    module_functions,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    memset(VALUE, -1, sizeof VALUE);
    for (int i = 0; i < 64; i++) {
        VALUE[(unsigned char)URLSAFE[i]] = (signed char)i;
    }
    if (PyType_Ready(&KeyType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Key", (PyObject *)&KeyType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

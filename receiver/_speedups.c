/* The hot path's loops in C: splitting a client's WebSocket bytes into text frames, parsing
 * the platform's usual media message, placing a frame that continues its track, a run of
 * such messages parsed and placed in one call, and decoding G.711 through its table.
 *
 * Each is the C twin of a Python function that stays the reference (receiver/frames.py
 * `_split_python`, receiver/protocol.py `_python_fast_media`, receiver/session.py
 * `_steady_python`, receiver/codecs.py `_take_python`): the tests hold the two to the same
 * results on random input. `media` accepts only the plainest form of the message (ASCII, no
 * escapes, canonical base64, three strings of digits, no repeated field) and returns None for
 * anything else, which the Python path then parses or refuses as before: it never accepts
 * what the Python path would refuse. `steady` likewise leaves any frame it does not place to
 * the session's general path. `place_run` is the two together, a message after another, with
 * no Python call and no Media between: its reference is the recording's loop calling
 * `StreamProtocol.receive` and `Session.media` for each (tests/test_speedups.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define TEXT_FINAL 0x81
#define PING_FINAL 0x89
#define PONG_FINAL 0x8A
#define MASKED 0x80
#define MAX_CONTROL_PAYLOAD 125
#define MAX_DIGITS 15

static PyObject *track_inbound;
static PyObject *track_outbound;

/* XOR with the 4-byte mask, 8 bytes at a time; the OR of every output byte. */
static unsigned char
unmask(unsigned char *out, const unsigned char *data, Py_ssize_t size, const unsigned char *mask)
{
    uint32_t mask32;
    memcpy(&mask32, mask, 4);
    uint64_t mask64 = ((uint64_t)mask32 << 32) | mask32, ored = 0;
    Py_ssize_t i = 0;
    for (; i + 8 <= size; i += 8) {
        uint64_t word;
        memcpy(&word, data + i, 8);
        word ^= mask64;
        ored |= word;
        memcpy(out + i, &word, 8);
    }
    unsigned char tail = 0;
    for (; i < size; i++) {
        out[i] = data[i] ^ mask[i & 3];
        tail |= out[i];
    }
    for (int k = 0; k < 8; k++) {
        tail |= (unsigned char)(ored >> (8 * k));
    }
    return tail;
}

/* A masked text payload as a str: unmasked straight into an ASCII str, or, if any byte is not
 * ASCII, decoded from there as strict UTF-8, as bytes.decode() does. NULL with
 * UnicodeDecodeError set if it is not UTF-8. */
static PyObject *
unmask_text(const unsigned char *data, Py_ssize_t size, const unsigned char *mask)
{
    PyObject *text = PyUnicode_New(size, 127);
    if (text == NULL) {
        return NULL;
    }
    unsigned char *out = PyUnicode_1BYTE_DATA(text);
    if (unmask(out, data, size, mask) < 0x80) {
        return text;
    }
    PyObject *decoded = PyUnicode_DecodeUTF8((const char *)out, size, NULL);
    Py_DECREF(text);
    return decoded;
}

/* split_frames(buffer, max_size, messages, control) -> (position, foreign)
 *
 * Appends each final, masked text frame up to max_size whose payload is UTF-8 to messages (as
 * str) and each final ping or pong up to 125 bytes to control (the whole frame, as bytes),
 * from the start of buffer; stops at the first incomplete frame (foreign False) or at the
 * first frame of any other kind (foreign True). position: where it stopped. */
static PyObject *
split_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "split_frames takes 4 arguments");
        return NULL;
    }
    Py_ssize_t max_size = PyLong_AsSsize_t(args[1]);
    if (max_size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *messages = args[2], *control = args[3];
    if (!PyList_Check(messages) || !PyList_Check(control)) {
        PyErr_SetString(PyExc_TypeError, "messages and control must be lists");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *buffer = view.buf;
    Py_ssize_t end = view.len, position = 0;
    int foreign = 0;
    while (end - position >= 2) {
        unsigned char head = buffer[position], second = buffer[position + 1];
        if (second < MASKED) {
            foreign = 1;
            break;
        }
        uint64_t size = second & 0x7F;
        Py_ssize_t start = position + 6;
        if (size == 126) {
            if (end - position < 4) {
                break;
            }
            size = ((uint64_t)buffer[position + 2] << 8) | buffer[position + 3];
            start = position + 8;
        }
        else if (size == 127) {
            if (end - position < 10) {
                break;
            }
            size = 0;
            for (int i = 2; i < 10; i++) {
                size = (size << 8) | buffer[position + i];
            }
            start = position + 14;
        }
        int text = head == TEXT_FINAL && size <= (uint64_t)max_size;
        int passed_on = (head == PING_FINAL || head == PONG_FINAL) && size <= MAX_CONTROL_PAYLOAD;
        if (!text && !passed_on) {
            foreign = 1;
            break;
        }
        Py_ssize_t stop = start + (Py_ssize_t)size;
        if (stop > end) {
            break;
        }
        PyObject *item;
        if (text) {
            item = unmask_text(buffer + start, (Py_ssize_t)size, buffer + start - 4);
            if (item == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                    goto failed;
                }
                PyErr_Clear(); /* websockets closes with 1007 */
                foreign = 1;
                break;
            }
        }
        else {
            item = PyBytes_FromStringAndSize((const char *)buffer + position, stop - position);
            if (item == NULL) {
                goto failed;
            }
        }
        int appended = PyList_Append(text ? messages : control, item);
        Py_DECREF(item);
        if (appended < 0) {
            goto failed;
        }
        position = stop;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nO)", position, foreign ? Py_True : Py_False);
failed:
    PyBuffer_Release(&view);
    return NULL;
}

/* The media message parser: a cursor over ASCII text. Every function returns 0 when the text
 * is not in the plain form this parser takes (the caller then returns None). */
typedef struct {
    const char *at;
    const char *end;
} Cursor;

static void
skip_space(Cursor *c)
{
    while (c->at < c->end &&
           (*c->at == ' ' || *c->at == '\t' || *c->at == '\n' || *c->at == '\r')) {
        c->at++;
    }
}

static int
expect(Cursor *c, char what)
{
    skip_space(c);
    if (c->at < c->end && *c->at == what) {
        c->at++;
        return 1;
    }
    return 0;
}

/* A string without escapes or control characters: its contents in [*start, *start + *size). */
static int
string(Cursor *c, const char **start, Py_ssize_t *size)
{
    if (!expect(c, '"')) {
        return 0;
    }
    const char *s = c->at;
    while (c->at < c->end) {
        unsigned char ch = (unsigned char)*c->at;
        if (ch == '"') {
            *start = s;
            *size = c->at - s;
            c->at++;
            return 1;
        }
        if (ch == '\\' || ch < 0x20) {
            return 0;
        }
        c->at++;
    }
    return 0;
}

static int
same(const char *s, Py_ssize_t size, const char *literal)
{
    size_t n = strlen(literal);
    return (size_t)size == n && memcmp(s, literal, n) == 0;
}

/* 1 to 15 ASCII digits (leading zeros allowed, as int("007") takes them). */
static int
digits(const char *s, Py_ssize_t size, long long *value)
{
    if (size < 1 || size > MAX_DIGITS) {
        return 0;
    }
    long long v = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return 0;
        }
        v = v * 10 + (s[i] - '0');
    }
    *value = v;
    return 1;
}

static const signed char BASE64[256] = {
    ['A'] = 1,  ['B'] = 2,  ['C'] = 3,  ['D'] = 4,  ['E'] = 5,  ['F'] = 6,  ['G'] = 7,
    ['H'] = 8,  ['I'] = 9,  ['J'] = 10, ['K'] = 11, ['L'] = 12, ['M'] = 13, ['N'] = 14,
    ['O'] = 15, ['P'] = 16, ['Q'] = 17, ['R'] = 18, ['S'] = 19, ['T'] = 20, ['U'] = 21,
    ['V'] = 22, ['W'] = 23, ['X'] = 24, ['Y'] = 25, ['Z'] = 26, ['a'] = 27, ['b'] = 28,
    ['c'] = 29, ['d'] = 30, ['e'] = 31, ['f'] = 32, ['g'] = 33, ['h'] = 34, ['i'] = 35,
    ['j'] = 36, ['k'] = 37, ['l'] = 38, ['m'] = 39, ['n'] = 40, ['o'] = 41, ['p'] = 42,
    ['q'] = 43, ['r'] = 44, ['s'] = 45, ['t'] = 46, ['u'] = 47, ['v'] = 48, ['w'] = 49,
    ['x'] = 50, ['y'] = 51, ['z'] = 52, ['0'] = 53, ['1'] = 54, ['2'] = 55, ['3'] = 56,
    ['4'] = 57, ['5'] = 58, ['6'] = 59, ['7'] = 60, ['8'] = 61, ['9'] = 62, ['+'] = 63,
    ['/'] = 64,
}; /* the value plus one; 0: not in the alphabet */

/* Canonical base64 only (padded, no whitespace, unused bits zero): every decoder reads it the
 * same way. NULL without an error set if the text is not canonical. */
static PyObject *
base64(const char *s, Py_ssize_t size)
{
    if (size % 4) {
        return NULL;
    }
    Py_ssize_t pad = 0;
    if (size && s[size - 1] == '=') {
        pad = (s[size - 2] == '=') ? 2 : 1;
    }
    PyObject *bytes = PyBytes_FromStringAndSize(NULL, size / 4 * 3 - pad);
    if (bytes == NULL) {
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(bytes);
    Py_ssize_t whole = size - (pad ? 4 : 0);
    for (Py_ssize_t i = 0; i < whole; i += 4) {
        int a = BASE64[(unsigned char)s[i]], b = BASE64[(unsigned char)s[i + 1]];
        int c = BASE64[(unsigned char)s[i + 2]], d = BASE64[(unsigned char)s[i + 3]];
        if (!a || !b || !c || !d) {
            goto not_canonical;
        }
        uint32_t v = ((uint32_t)(a - 1) << 18) | ((uint32_t)(b - 1) << 12) |
                     ((uint32_t)(c - 1) << 6) | (uint32_t)(d - 1);
        *out++ = (unsigned char)(v >> 16);
        *out++ = (unsigned char)(v >> 8);
        *out++ = (unsigned char)v;
    }
    if (pad) {
        const char *q = s + whole;
        int a = BASE64[(unsigned char)q[0]], b = BASE64[(unsigned char)q[1]];
        if (!a || !b) {
            goto not_canonical;
        }
        if (pad == 2) {
            if ((b - 1) & 0x0F) {
                goto not_canonical;
            }
            *out = (unsigned char)(((a - 1) << 2) | ((b - 1) >> 4));
        }
        else {
            int c = BASE64[(unsigned char)q[2]];
            if (!c || ((c - 1) & 0x03)) {
                goto not_canonical;
            }
            uint32_t v = ((uint32_t)(a - 1) << 12) | ((uint32_t)(b - 1) << 6) | (uint32_t)(c - 1);
            *out++ = (unsigned char)(v >> 10);
            *out = (unsigned char)(v >> 2);
        }
    }
    return bytes;
not_canonical:
    Py_DECREF(bytes);
    return NULL;
}

/* The payload string: its end by memchr; base64() then refuses any character outside its
 * alphabet (escapes and control characters included). */
static int
payload_string(Cursor *c, const char **start, Py_ssize_t *size)
{
    if (!expect(c, '"')) {
        return 0;
    }
    const char *quote = memchr(c->at, '"', c->end - c->at);
    if (quote == NULL) {
        return 0;
    }
    *start = c->at;
    *size = quote - c->at;
    c->at = quote + 1;
    return 1;
}

/* An unknown field's value: only a plain string is skipped; anything else is not plain. */
static int
skip_value(Cursor *c)
{
    const char *s;
    Py_ssize_t n;
    return string(c, &s, &n);
}

typedef struct {
    const char *track, *payload, *chunk, *timestamp;
    Py_ssize_t track_n, payload_n, chunk_n, timestamp_n;
} Body;

static int
body(Cursor *c, Body *b)
{
    if (!expect(c, '{')) {
        return 0;
    }
    if (expect(c, '}')) {
        return 1;
    }
    do {
        const char *key, *value;
        Py_ssize_t key_n, value_n;
        if (!string(c, &key, &key_n) || !expect(c, ':')) {
            return 0;
        }
        const char **slot = NULL;
        Py_ssize_t *slot_n = NULL;
        if (same(key, key_n, "track")) {
            slot = &b->track, slot_n = &b->track_n;
        }
        else if (same(key, key_n, "payload")) {
            slot = &b->payload, slot_n = &b->payload_n;
        }
        else if (same(key, key_n, "chunk")) {
            slot = &b->chunk, slot_n = &b->chunk_n;
        }
        else if (same(key, key_n, "timestamp")) {
            slot = &b->timestamp, slot_n = &b->timestamp_n;
        }
        if (slot == NULL) {
            if (!skip_value(c)) {
                return 0;
            }
            continue;
        }
        int plain = slot == &b->payload ? payload_string(c, &value, &value_n)
                                        : string(c, &value, &value_n);
        if (*slot != NULL || !plain) {
            return 0; /* a repeated field, or not a plain string */
        }
        *slot = value, *slot_n = value_n;
    } while (expect(c, ','));
    return expect(c, '}');
}

/* The plain media message's fields; payload a new reference, track one of the interned names. */
typedef struct {
    PyObject *track;
    PyObject *payload;
    long long chunk, timestamp, sequence;
} Plain;

/* 1 with *m filled if text is the plain media message, 0 if it is not, -1 with an error set. */
static int
parse_media(PyObject *text, Plain *m)
{
    if (!PyUnicode_CheckExact(text) || !PyUnicode_IS_ASCII(text)) {
        return 0;
    }
    Cursor c = {(const char *)PyUnicode_1BYTE_DATA(text), NULL};
    c.end = c.at + PyUnicode_GET_LENGTH(text);
    const char *event = NULL, *sequence = NULL;
    Py_ssize_t event_n = 0, sequence_n = 0;
    int have_body = 0;
    Body b = {0};
    if (!expect(&c, '{') || expect(&c, '}')) {
        return 0;
    }
    do {
        const char *key;
        Py_ssize_t key_n;
        if (!string(&c, &key, &key_n) || !expect(&c, ':')) {
            return 0;
        }
        if (same(key, key_n, "media")) {
            if (have_body || !body(&c, &b)) {
                return 0;
            }
            have_body = 1;
        }
        else if (same(key, key_n, "event")) {
            if (event != NULL || !string(&c, &event, &event_n)) {
                return 0;
            }
        }
        else if (same(key, key_n, "sequenceNumber")) {
            if (sequence != NULL || !string(&c, &sequence, &sequence_n)) {
                return 0;
            }
        }
        else if (!skip_value(&c)) {
            return 0;
        }
    } while (expect(&c, ','));
    if (!expect(&c, '}')) {
        return 0;
    }
    skip_space(&c);
    if (c.at != c.end || !have_body || event == NULL || !same(event, event_n, "media") ||
        b.track == NULL || b.payload == NULL || b.chunk == NULL || b.timestamp == NULL ||
        sequence == NULL) {
        return 0;
    }
    if (same(b.track, b.track_n, "inbound") || same(b.track, b.track_n, "inbound_track")) {
        m->track = track_inbound;
    }
    else if (same(b.track, b.track_n, "outbound") ||
             same(b.track, b.track_n, "outbound_track")) {
        m->track = track_outbound;
    }
    else {
        return 0;
    }
    if (!digits(b.chunk, b.chunk_n, &m->chunk) ||
        !digits(b.timestamp, b.timestamp_n, &m->timestamp) ||
        !digits(sequence, sequence_n, &m->sequence)) {
        return 0;
    }
    m->payload = base64(b.payload, b.payload_n);
    if (m->payload == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    return 1;
}

/* media(text, cls) -> cls(track, payload, chunk, timestamp, sequence) or None */
static PyObject *
media(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyType_Check(args[1]) ||
        !PyType_IsSubtype((PyTypeObject *)args[1], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "media takes a str and a tuple type");
        return NULL;
    }
    Plain m;
    int found = parse_media(args[0], &m);
    if (found <= 0) {
        return found < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyTypeObject *cls = (PyTypeObject *)args[1];
    PyObject *items[5] = {Py_NewRef(m.track), m.payload, PyLong_FromLongLong(m.chunk),
                          PyLong_FromLongLong(m.timestamp), PyLong_FromLongLong(m.sequence)};
    PyObject *result = NULL;
    if (items[2] != NULL && items[3] != NULL && items[4] != NULL) {
        result = cls->tp_alloc(cls, 5);
    }
    if (result == NULL) {
        for (int i = 0; i < 5; i++) {
            Py_XDECREF(items[i]);
        }
        return NULL;
    }
    for (int i = 0; i < 5; i++) {
        PyTuple_SET_ITEM(result, i, items[i]);
    }
    return result;
}

/* lookup16(data, table): every byte of data indexes table, 256 native int16 values (a G.711
 * decoder's); the samples come back as a bytearray, twice data's length. */
static PyObject *
lookup16(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "lookup16(data, table)");
        return NULL;
    }
    Py_buffer data, table;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &table, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *out = NULL;
    if (table.len != 256 * (Py_ssize_t)sizeof(int16_t)) {
        PyErr_SetString(PyExc_ValueError, "table must hold 256 int16 values");
    } else if (data.len > PY_SSIZE_T_MAX / 2) {
        PyErr_NoMemory();
    } else {
        int16_t values[256];
        memcpy(values, table.buf, sizeof(values)); /* the buffer need not be aligned */
        out = PyByteArray_FromStringAndSize(NULL, data.len * 2);
        if (out != NULL) {
            const unsigned char *in = data.buf;
            char *samples = PyByteArray_AS_STRING(out);
            for (Py_ssize_t i = 0; i < data.len; i++) {
                memcpy(samples + 2 * i, &values[in[i]], sizeof(int16_t));
            }
        }
    }
    PyBuffer_Release(&table);
    PyBuffer_Release(&data);
    return out;
}

/* steady(clock, frame, rate, max_samples): Session.media's fast path. The clock and its stats
 * are slots objects (receiver/session.py `_TrackClock`, `TrackStats`); their slots are found
 * by name once a type, through the member descriptors `__slots__` makes, and read and written
 * at their offsets as CPython's own slot access does. Every value is checked before anything
 * is written, so False always means the frame changed nothing; so does any value out of the
 * range kept here (|value| <= 2^60, the timestamp's product with the rate), which the general
 * path then places as it places every other frame. */
#define LIMIT (1LL << 60)
#define MAX_RATE 65536

enum { NEXT_CHUNK, FRAME_BYTES, CURSOR, OFFSET, FRAME_SAMPLES, FRAME_TOLERANCE, SHIFT, PENDING,
       PENDING_START, PENDING_SAMPLES, STATS, CLOCK_SLOTS };
static const char *clock_names[CLOCK_SLOTS] = {
    "next_chunk", "frame_bytes", "cursor", "offset", "frame_samples", "frame_tolerance",
    "shift", "pending", "pending_start", "pending_samples", "stats"};
enum { FRAMES, BYTES, LAST_CHUNK, LAST_TIMESTAMP_MS, AUDIO_SAMPLES, SAMPLES, STATS_SLOTS };
static const char *stats_names[STATS_SLOTS] = {
    "frames", "bytes", "last_chunk", "last_timestamp_ms", "audio_samples", "samples"};
_Static_assert((int)STATS_SLOTS <= (int)CLOCK_SLOTS, "Slots.offsets holds either type's");

typedef struct {
    PyTypeObject *type; /* a strong reference: the offsets belong to it */
    Py_ssize_t offsets[CLOCK_SLOTS]; /* the clock's slots outnumber the stats' */
} Slots;

static Slots clock_slots, stats_slots;

/* The offsets of type's slots `names`; -1 with TypeError if one is not a plain slot. */
static int
bind(Slots *slots, PyTypeObject *type, const char **names, int count)
{
    Py_ssize_t offsets[sizeof(slots->offsets) / sizeof(slots->offsets[0])];
    for (int i = 0; i < count; i++) {
        PyObject *descr = PyDict_GetItemString(type->tp_dict, names[i]);
        PyMemberDef *member =
            descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)
                ? ((PyMemberDescrObject *)descr)->d_member
                : NULL;
        if (member == NULL || member->type != T_OBJECT_EX || (member->flags & READONLY)) {
            PyErr_Format(PyExc_TypeError, "%s.%s is not a slot", type->tp_name, names[i]);
            return -1;
        }
        offsets[i] = member->offset;
    }
    memcpy(slots->offsets, offsets, count * sizeof(offsets[0])); /* none unless all are found */
    Py_XSETREF(slots->type, (PyTypeObject *)Py_NewRef(type));
    return 0;
}

#define SLOT(obj, slots, i) ((PyObject **)((char *)(obj) + (slots).offsets[i]))

/* An exact int within LIMIT, else 0 (not one the fast path takes). */
static int
small_int(PyObject *value, long long *out)
{
    if (value == NULL || !PyLong_CheckExact(value)) {
        return 0;
    }
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(value, &overflow);
    return !overflow && *out >= -LIMIT && *out <= LIMIT;
}

/* Place one frame on the steady path: 1 placed, 0 left to the general path (nothing changed),
 * -1 with an error set. chunk_obj and timestamp_obj are the frame's ints, or NULL to make them
 * from chunk and timestamp. */
static int
place(PyObject *clock, PyObject *payload, long long chunk, PyObject *chunk_obj,
      long long timestamp, PyObject *timestamp_obj, long long rate, long long max_samples)
{
    if (Py_TYPE(clock) != clock_slots.type &&
        bind(&clock_slots, Py_TYPE(clock), clock_names, CLOCK_SLOTS) < 0) {
        return -1;
    }
    long long next_chunk, frame_bytes;
    if (!PyBytes_CheckExact(payload) || chunk < -LIMIT || chunk > LIMIT || timestamp < 0 ||
        timestamp > LIMIT / MAX_RATE ||
        !small_int(*SLOT(clock, clock_slots, NEXT_CHUNK), &next_chunk) ||
        chunk != next_chunk ||
        !small_int(*SLOT(clock, clock_slots, FRAME_BYTES), &frame_bytes) ||
        PyBytes_GET_SIZE(payload) != frame_bytes || rate < 0 || rate > MAX_RATE ||
        max_samples < -LIMIT || max_samples > LIMIT) {
        return 0;
    }
    long long cursor, offset, n, tolerance, shift, pending_samples;
    PyObject *pending = *SLOT(clock, clock_slots, PENDING);
    PyObject *stats = *SLOT(clock, clock_slots, STATS);
    if (!small_int(*SLOT(clock, clock_slots, CURSOR), &cursor) ||
        !small_int(*SLOT(clock, clock_slots, OFFSET), &offset) ||
        !small_int(*SLOT(clock, clock_slots, FRAME_SAMPLES), &n) ||
        !small_int(*SLOT(clock, clock_slots, FRAME_TOLERANCE), &tolerance) ||
        !small_int(*SLOT(clock, clock_slots, SHIFT), &shift) ||
        !small_int(*SLOT(clock, clock_slots, PENDING_SAMPLES), &pending_samples) ||
        pending == NULL || !PyList_CheckExact(pending) || stats == NULL) {
        return 0;
    }
    long long target = timestamp * rate / 1000 - offset; /* both >= 0: as Python's // */
    long long delta = target - cursor;
    if (!(-tolerance <= delta && delta <= tolerance && (delta >= 0 || shift + delta > -n) &&
          target + n <= max_samples)) {
        return 0;
    }
    if (Py_TYPE(stats) != stats_slots.type &&
        bind(&stats_slots, Py_TYPE(stats), stats_names, STATS_SLOTS) < 0) {
        return -1;
    }
    long long frames, bytes, audio_samples;
    if (!small_int(*SLOT(stats, stats_slots, FRAMES), &frames) ||
        !small_int(*SLOT(stats, stats_slots, BYTES), &bytes) ||
        !small_int(*SLOT(stats, stats_slots, AUDIO_SAMPLES), &audio_samples)) {
        return 0;
    }
    int started = PyList_GET_SIZE(pending) == 0; /* the batch starts with this frame */
    /* Every new value first: past this block nothing can fail. */
    PyObject *values[] = {
        PyLong_FromLongLong(frames + 1),       PyLong_FromLongLong(bytes + frame_bytes),
        PyLong_FromLongLong(chunk + 1),        PyLong_FromLongLong(-delta),
        PyLong_FromLongLong(pending_samples + n), PyLong_FromLongLong(cursor + n),
        PyLong_FromLongLong(audio_samples + n),
        started ? PyLong_FromLongLong(cursor) : Py_NewRef(Py_None),
        chunk_obj != NULL ? Py_NewRef(chunk_obj) : PyLong_FromLongLong(chunk),
        timestamp_obj != NULL ? Py_NewRef(timestamp_obj) : PyLong_FromLongLong(timestamp),
    };
    enum { V_FRAMES, V_BYTES, V_NEXT_CHUNK, V_SHIFT, V_PENDING_SAMPLES, V_CURSOR, V_AUDIO,
           V_PENDING_START, V_CHUNK, V_TIMESTAMP, V_COUNT };
    int failed = 0;
    for (int i = 0; i < V_COUNT; i++) {
        failed |= values[i] == NULL;
    }
    if (failed || PyList_Append(pending, payload) < 0) {
        for (int i = 0; i < V_COUNT; i++) {
            Py_XDECREF(values[i]);
        }
        return -1;
    }
    Py_XSETREF(*SLOT(stats, stats_slots, FRAMES), values[V_FRAMES]);
    Py_XSETREF(*SLOT(stats, stats_slots, BYTES), values[V_BYTES]);
    Py_XSETREF(*SLOT(stats, stats_slots, LAST_CHUNK), values[V_CHUNK]);
    Py_XSETREF(*SLOT(stats, stats_slots, LAST_TIMESTAMP_MS), values[V_TIMESTAMP]);
    Py_XSETREF(*SLOT(clock, clock_slots, NEXT_CHUNK), values[V_NEXT_CHUNK]);
    Py_XSETREF(*SLOT(clock, clock_slots, SHIFT), values[V_SHIFT]);
    if (started) {
        Py_XSETREF(*SLOT(clock, clock_slots, PENDING_START), values[V_PENDING_START]);
    } else {
        Py_DECREF(values[V_PENDING_START]);
    }
    Py_XSETREF(*SLOT(clock, clock_slots, PENDING_SAMPLES), values[V_PENDING_SAMPLES]);
    Py_XSETREF(*SLOT(clock, clock_slots, CURSOR), Py_NewRef(values[V_CURSOR]));
    Py_XSETREF(*SLOT(stats, stats_slots, SAMPLES), values[V_CURSOR]);
    Py_XSETREF(*SLOT(stats, stats_slots, AUDIO_SAMPLES), values[V_AUDIO]);
    return 1;
}

static PyObject *
steady(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "steady(clock, frame, rate, max_samples)");
        return NULL;
    }
    PyObject *clock = args[0], *frame = args[1];
    if (Py_TYPE(clock) != clock_slots.type &&
        bind(&clock_slots, Py_TYPE(clock), clock_names, CLOCK_SLOTS) < 0) {
        return NULL;
    }
    if (!PyTuple_Check(frame) || PyTuple_GET_SIZE(frame) < 4) {
        PyErr_SetString(PyExc_TypeError, "frame must be a Media");
        return NULL;
    }
    PyObject *chunk_obj = PyTuple_GET_ITEM(frame, 2), *timestamp_obj = PyTuple_GET_ITEM(frame, 3);
    long long chunk, timestamp, rate, max_samples;
    if (!small_int(chunk_obj, &chunk) || !small_int(timestamp_obj, &timestamp) ||
        !small_int(args[2], &rate) || !small_int(args[3], &max_samples)) {
        Py_RETURN_FALSE;
    }
    int placed = place(clock, PyTuple_GET_ITEM(frame, 1), chunk, chunk_obj, timestamp,
                       timestamp_obj, rate, max_samples);
    if (placed < 0) {
        return NULL;
    }
    return PyBool_FromLong(placed);
}

/* place_run(messages, start, tracks, rate, max_samples, batch_samples) -> (end, due): from
 * messages[start], each plain media message (parse_media's) that its track's clock in `tracks`
 * takes on the steady path (place's) is placed, with no Media and no Python call a frame. It
 * stops before the first message it does not take (due None), or after a frame that brings
 * its track's pending samples to batch_samples (due that track). */
static PyObject *
place_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "place_run(messages, start, tracks: dict, rate, max_samples, "
                        "batch_samples)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (start < 0) {
        PyErr_SetString(PyExc_ValueError, "place_run's start must be >= 0");
        return NULL;
    }
    long long rate, max_samples, batch_samples;
    if (!small_int(args[3], &rate) || !small_int(args[4], &max_samples) ||
        !small_int(args[5], &batch_samples)) {
        return Py_BuildValue("(nO)", start, Py_None); /* none taken */
    }
    PyObject *list = PySequence_Fast(args[0], "place_run's messages must be a sequence");
    if (list == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(list), i;
    PyObject **items = PySequence_Fast_ITEMS(list);
    PyObject *due = Py_None;
    for (i = start; i < count; i++) {
        Plain m;
        int found = parse_media(items[i], &m);
        if (found <= 0) {
            if (found < 0) {
                goto failed;
            }
            break;
        }
        PyObject *clock = PyDict_GetItemWithError(args[2], m.track);
        int placed = clock == NULL ? (PyErr_Occurred() ? -1 : 0)
                                   : place(clock, m.payload, m.chunk, NULL, m.timestamp, NULL,
                                           rate, max_samples);
        Py_DECREF(m.payload); /* the pending list holds it if it was placed */
        if (placed < 0) {
            goto failed;
        }
        if (!placed) {
            break;
        }
        long long pending;
        if (small_int(*SLOT(clock, clock_slots, PENDING_SAMPLES), &pending) &&
            pending >= batch_samples) {
            due = m.track;
            i++;
            break;
        }
    }
    Py_DECREF(list);
    return Py_BuildValue("(nO)", i, due);
failed:
    Py_DECREF(list);
    return NULL;
}

static PyMethodDef methods[] = {
    {"split_frames", (PyCFunction)(void (*)(void))split_frames, METH_FASTCALL,
     "split_frames(buffer, max_size, messages, control) -> (position, foreign)"},
    {"media", (PyCFunction)(void (*)(void))media, METH_FASTCALL,
     "media(text, cls) -> cls(track, payload, chunk, timestamp, sequence) or None"},
    {"lookup16", (PyCFunction)(void (*)(void))lookup16, METH_FASTCALL,
     "lookup16(data, table) -> bytearray of table[byte] for each byte (int16 samples)"},
    {"steady", (PyCFunction)(void (*)(void))steady, METH_FASTCALL,
     "steady(clock, frame, rate, max_samples) -> whether the fast path placed the frame"},
    {"place_run", (PyCFunction)(void (*)(void))place_run, METH_FASTCALL,
     "place_run(messages, start, tracks, rate, max_samples, batch_samples) -> (end, due)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "receiver._speedups", "The hot path's loops in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    track_inbound = PyUnicode_InternFromString("inbound");
    track_outbound = PyUnicode_InternFromString("outbound");
    if (track_inbound == NULL || track_outbound == NULL) {
        return NULL;
    }
    return PyModule_Create(&module);
}

# cython: language_level=3
"""Native frame codec: the wire format of PROTOCOL.md sections 2-4, 6, 7, 13, 16.

Same API and behaviour as the independently written twin ``_codec_py.py``
(see notes/CODEC_API.md); the twin is the oracle of the differential tests.

Layout of this file:

* constants and the per-type schema table, built once at import from
  ``core/codes.py`` (the one home of types, flags, codes, kinds and field
  layouts) into C arrays, so the hot loops index arrays instead of dicts;
* ``Frame``: 112 bytes, C-level fields (ints as sparse slot/value entries),
  freelist, not GC-tracked;
* ``Decoder``: parses straight out of the caller's buffer; only the bytes of
  one incomplete frame are ever copied (into ``_pbuf``);
* ``Encoder``: a validating pass that computes every size and collects
  pointers (``Prep``), then one write, into an exact-size bytes object
  (``encode``) or at the end of a growing one (``encode_batch``).

Costs per uncompressed DELIVER frame: decode is one Frame allocation (usually
from the freelist), one bytes object for the payload and one list append;
registered kinds are shared interned str objects, ints are C fields.  Encode
creates no Python object at all (the kind code comes from a one-entry identity
cache, else a dict lookup); the output bytes is allocated once per call
(``encode``) or grown by doubling (``encode_batch``).  Decoding a large buffer
is dominated by touching fresh memory for the new objects (page faults), hence
the small Frame.
"""

cimport cython
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact,
                            PyBytes_FromStringAndSize, PyBytes_GET_SIZE)
from cpython.buffer cimport (PyBUF_SIMPLE, PyBuffer_Release, PyObject_CheckBuffer,
                             PyObject_GetBuffer)
from cpython.long cimport PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport PyObject
from cpython.list cimport PyList_Append
from cpython.unicode cimport (PyUnicode_AsUTF8AndSize, PyUnicode_Check,
                              PyUnicode_CheckExact, PyUnicode_FromObject)
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy

cdef extern from "Python.h":
    # Cython's declaration takes a non-const char*; ours reads from const input.
    object _decode_utf8 "PyUnicode_DecodeUTF8" (const char *s, Py_ssize_t size, const char *errors)
    Py_ssize_t PyUnicode_GET_LENGTH(object s)
    PyObject *PyDict_GetItemWithError(object d, object key) except? NULL
    # Raw-pointer forms for the bytes object encode_batch grows in place.
    PyObject *_new_bytes "PyBytes_FromStringAndSize" (const char *s, Py_ssize_t n) except NULL
    char *_bytes_data "PyBytes_AS_STRING" (PyObject *b)
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE" (PyObject *b)
    int _PyBytes_Resize(PyObject **b, Py_ssize_t n) except -1
    void Py_XDECREF(PyObject *o)
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    int PyBUF_READ

from sys import intern as _intern

import lz4.block as _lz4block

from tillwire.core import codes as _codes
from tillwire.core.errors import ProtocolError

IMPLEMENTATION = "native"

ctypedef unsigned char uchar


# ---------------------------------------------------------------------------
# Constants from core/codes.py (read once; C globals so hot code just loads them)

cdef int C_MALFORMED = _codes.Code.MALFORMED
cdef int C_FRAME_TOO_LARGE = _codes.Code.FRAME_TOO_LARGE
cdef int C_UNKNOWN_FRAME = _codes.Code.UNKNOWN_FRAME
cdef int C_BAD_VARINT = _codes.Code.BAD_VARINT
cdef int C_BAD_FLAGS = _codes.Code.BAD_FLAGS
cdef int C_BAD_COMPRESSION = _codes.Code.BAD_COMPRESSION
cdef int C_BAD_UTF8 = _codes.Code.BAD_UTF8
cdef int C_BAD_KIND = _codes.Code.BAD_KIND

cdef int F_COMPRESSED = _codes.Flag.COMPRESSED
cdef int F_LANE = _codes.Flag.LANE_MASK
cdef int T_DELIVER = _codes.FrameType.DELIVER
cdef int T_BROADCAST = _codes.FrameType.BROADCAST
cdef int T_SENDACK = _codes.FrameType.SENDACK

cdef Py_ssize_t MIN_LIMIT = _codes.MIN_FRAME_SIZE_LIMIT
cdef Py_ssize_t MAX_LIMIT = _codes.MAX_FRAME_SIZE_LIMIT
cdef Py_ssize_t MAX_KIND_LEN = _codes.MAX_CUSTOM_KIND_LEN

cdef object _lz4_compress = _lz4block.compress
cdef object _lz4_decompress = _lz4block.decompress
cdef tuple _LZ4_ERRORS = (_lz4block.LZ4BlockError, ValueError, OverflowError)

# Bytes of an incomplete frame's buffer kept between frames; a larger one is
# freed once its frame completed, so an idle connection holds little.
cdef Py_ssize_t PBUF_KEEP = 64 * 1024
# First allocation of encode_batch's output (grown by doubling).
cdef Py_ssize_t BATCH_START = 4096

cdef enum:
    FK_U = 1            # uvarint field
    FK_S = 2            # string field
    FK_K = 3            # kind field
    KNOWN_NONE = 0      # type byte not usable: UNKNOWN_FRAME
    KNOWN_CORE = 1      # type with a schema
    KNOWN_EXT = 2       # extension type: raw body, flags unchecked
    ODD_TYPE = 16       # Frame._odd_vals key of `type` (int field slots are 0..MAX_INT_SLOTS-1)
    ODD_FLAGS = 17      # Frame._odd_vals key of `flags`
    STR_TOKEN = 0       # string slots: which Frame object field a STR/kind field lives in
    STR_TO = 1
    STR_KIND = 2
    STR_KEY = 3
    PREFIX_INCOMPLETE = -1


ctypedef struct Schema:
    int known                        # KNOWN_NONE / KNOWN_CORE / KNOWN_EXT
    int allowed                      # allowed flag bits, COMPRESSED included
    int nfields                      # number of fields before the payload
    int kind[MAX_SCHEMA_FIELDS]      # FK_U / FK_S / FK_K, wire order
    int slot[MAX_SCHEMA_FIELDS]      # FK_U: int slot (index in codes.INT_FIELDS); FK_S/FK_K: STR_* slot


cdef Schema _SCHEMAS[256]            # indexed by the type byte
cdef list _SCHEMA_NAMES = [()] * 256  # type -> field names, for error messages and repr only

cdef tuple _INT_FIELDS = tuple(_codes.INT_FIELDS)
cdef tuple _STR_FIELDS = tuple(_codes.STR_FIELDS)
cdef dict _STR_SLOT_OF = {"token": STR_TOKEN, "to": STR_TO, "kind": STR_KIND, "key": STR_KEY}
cdef dict _FIELD_SLOT = {}           # keyword name -> int slot, or 100 + STR_* slot

cdef PyObject **_KIND_NAMES = NULL   # code -> interned name (borrowed from _kind_keep), NULL if unregistered
cdef uint64_t _MAX_KIND_CODE = 0
cdef list _kind_keep = []
cdef dict _KIND_CODE = {}            # name -> code (int), for encode


cdef int _init_tables() except -1:
    global _KIND_NAMES, _MAX_KIND_CODE
    cdef int t, i
    cdef Py_ssize_t j
    cdef Schema *sc
    if len(_INT_FIELDS) > MAX_INT_SLOTS:
        raise ImportError(f"codes.INT_FIELDS has more than {MAX_INT_SLOTS} fields")
    if set(_STR_FIELDS) != set(_STR_SLOT_OF):
        raise ImportError("codes.STR_FIELDS does not match Frame's string fields")
    for i, name in enumerate(_INT_FIELDS):
        _FIELD_SLOT[name] = i
    for name in _STR_FIELDS:
        _FIELD_SLOT[name] = 100 + <int>_STR_SLOT_OF[name]
    for t in range(256):
        sc = &_SCHEMAS[t]
        sc.known = KNOWN_NONE
        sc.allowed = 0
        sc.nfields = 0
    for t in _codes.EXTENSION_TYPES:
        _SCHEMAS[t].known = KNOWN_EXT
    for t, (fields, allowed) in _codes.FRAME_SCHEMAS.items():
        if len(fields) > MAX_SCHEMA_FIELDS:
            raise ImportError(f"frame type {t:#x} has more than {MAX_SCHEMA_FIELDS} fields")
        sc = &_SCHEMAS[t]
        sc.known = KNOWN_CORE
        sc.allowed = allowed | F_COMPRESSED
        sc.nfields = len(fields)
        if sum(1 for _, fk in fields if fk == _codes.U) > INLINE_INTS:
            raise ImportError(f"frame type {t:#x} has more than {INLINE_INTS} int fields")
        for i, (name, fk) in enumerate(fields):
            if fk == _codes.U:
                sc.kind[i] = FK_U
                sc.slot[i] = _INT_FIELDS.index(name)
            elif fk == _codes.S or fk == _codes.K:
                sc.kind[i] = FK_S if fk == _codes.S else FK_K
                sc.slot[i] = _STR_SLOT_OF[name]
            else:
                raise ImportError(f"unknown field kind {fk!r} in FRAME_SCHEMAS")
        _SCHEMA_NAMES[t] = tuple(name for name, _ in fields)
    _MAX_KIND_CODE = max(_codes.KINDS) if _codes.KINDS else 0
    _KIND_NAMES = <PyObject **>PyMem_Malloc((_MAX_KIND_CODE + 1) * sizeof(PyObject *))
    if _KIND_NAMES == NULL:
        raise MemoryError()
    for j in range(<Py_ssize_t>_MAX_KIND_CODE + 1):
        _KIND_NAMES[j] = NULL
    for code, name in _codes.KINDS.items():
        name = _intern(str(name))
        _kind_keep.append(name)
        if code >= 1:
            _KIND_NAMES[<Py_ssize_t>code] = <PyObject *>name
        _KIND_CODE[name] = int(code)
    return 0


_init_tables()

cdef int _I_VERSION = _INT_FIELDS.index("version")
cdef int _I_HEARTBEAT = _INT_FIELDS.index("heartbeat")
cdef int _I_TIME = _INT_FIELDS.index("time")
cdef int _I_MAX_FRAME = _INT_FIELDS.index("max_frame")
cdef int _I_EPOCH = _INT_FIELDS.index("epoch")
cdef int _I_P0 = _INT_FIELDS.index("p0")
cdef int _I_P1 = _INT_FIELDS.index("p1")
cdef int _I_SEQ = _INT_FIELDS.index("seq")
cdef int _I_CODE = _INT_FIELDS.index("code")
cdef int _I_DELAY = _INT_FIELDS.index("delay")
cdef int _I_REF = _INT_FIELDS.index("ref")
cdef int _I_TTL = _INT_FIELDS.index("ttl")
cdef int _I_MSG_ID = _INT_FIELDS.index("msg_id")
cdef int _I_CHANNEL = _INT_FIELDS.index("channel")
cdef int _I_OFFSET = _INT_FIELDS.index("offset")
cdef int _I_COUNT = _INT_FIELDS.index("count")


# ---------------------------------------------------------------------------
# Varints

cdef inline int _read_uvarint(const uchar **pp, const uchar *end, uint64_t *out) noexcept nogil:
    """Read a canonical uvarint at *pp (bytes before `end`); advance *pp.

    Returns 0, C_MALFORMED (runs past `end`) or C_BAD_VARINT (non-canonical,
    a 10th byte other than 01).  Never reads at or past `end`.
    """
    cdef const uchar *p = pp[0]
    cdef uint64_t b, v
    cdef int shift
    if p >= end:
        return C_MALFORMED
    b = p[0]
    if b < 0x80:
        out[0] = b
        pp[0] = p + 1
        return 0
    v = b & 0x7f
    shift = 7
    p += 1
    while True:
        if p >= end:
            return C_MALFORMED
        b = p[0]
        p += 1
        if shift == 63:
            # 10th byte: only 01 keeps the value below 2**64 and canonical.
            if b != 1:
                return C_BAD_VARINT
            v |= (<uint64_t>1) << 63
            break
        v |= (b & 0x7f) << shift
        if b < 0x80:
            if b == 0:
                return C_BAD_VARINT
            break
        shift += 7
    out[0] = v
    pp[0] = p
    return 0


cdef inline int _parse_prefix(const uchar *p, Py_ssize_t avail, Py_ssize_t limit,
                              Py_ssize_t *length, Py_ssize_t *plen) noexcept nogil:
    """Parse the length prefix (section 16 step 1) from `avail` bytes at p.

    Returns 0 (sets *length, *plen), PREFIX_INCOMPLETE (needs more bytes;
    only when avail < 4) or the error code, in the spec's precedence.
    """
    cdef Py_ssize_t v = 0
    cdef int i
    cdef uchar b
    for i in range(4):
        if i >= avail:
            return PREFIX_INCOMPLETE
        b = p[i]
        v |= (<Py_ssize_t>(b & 0x7f)) << (7 * i)
        if b < 0x80:
            if b == 0 and i > 0:
                return C_BAD_VARINT
            if v > limit:
                return C_FRAME_TOO_LARGE
            if v < 2:
                return C_MALFORMED
            length[0] = v
            plen[0] = i + 1
            return 0
    return C_FRAME_TOO_LARGE        # a 4th byte with the continuation bit


cdef inline int _uvarint_size(uint64_t v) noexcept nogil:
    cdef int n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline char *_put_uvarint(char *w, uint64_t v) noexcept nogil:
    while v >= 0x80:
        w[0] = <char>((v & 0x7f) | 0x80)
        v >>= 7
        w += 1
    w[0] = <char>v
    return w + 1


cdef object _utf8(const uchar *p, Py_ssize_t n):
    """Strict UTF-8 (rejects encoded surrogates) -> str, or None when invalid."""
    try:
        return _decode_utf8(<const char *>p, n, NULL)
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------------------
# Frame


cdef inline object _get_int(Frame f, int slot):
    cdef int i
    if f._odd_vals is not None and slot in f._odd_vals:
        return f._odd_vals[slot]
    for i in range(f._nints):
        if f._islot[i] == slot:
            return f._ival[i]
    return 0


cdef inline uint64_t _int_of(Frame f, int slot) noexcept:
    """The C value of int field `slot` (0 when absent); caller knows it is not odd."""
    cdef int i
    for i in range(f._nints):
        if f._islot[i] == slot:
            return f._ival[i]
    return 0


cdef int _drop_inline(Frame f, int slot) except -1:
    cdef int i, last
    for i in range(f._nints):
        if f._islot[i] == slot:
            last = f._nints - 1
            f._islot[i] = f._islot[last]
            f._ival[i] = f._ival[last]
            f._nints = last
            return 0
    return 0


cdef int _set_odd(Frame f, int slot, object v) except -1:
    if f._odd_vals is None:
        f._odd_vals = {}
    f._odd_vals[slot] = v
    return 0


cdef inline int _clear_odd(Frame f, int slot) except -1:
    if f._odd_vals is not None and slot in f._odd_vals:
        del f._odd_vals[slot]
        if not f._odd_vals:
            f._odd_vals = None
    return 0


cdef int _set_int(Frame f, int slot, object v) except -1:
    """Store an int field: inline C value when 0 <= v < 2**64 (and an entry is
    free), else the object itself in _odd_vals for encode to check."""
    cdef uint64_t x
    cdef int i
    if PyLong_Check(v):
        try:
            x = v
        except OverflowError:
            pass
        else:
            _clear_odd(f, slot)
            for i in range(f._nints):
                if f._islot[i] == slot:
                    f._ival[i] = x
                    return 0
            if x == 0:
                return 0                    # absent == 0
            if f._nints < INLINE_INTS:
                f._islot[f._nints] = <unsigned char>slot
                f._ival[f._nints] = x
                f._nints += 1
                return 0
            return _set_odd(f, slot, v)     # a 6th non-zero field: valid, held as an object
    _drop_inline(f, slot)
    return _set_odd(f, slot, v)


cdef int _set_byte(Frame f, int which, object v) except -1:
    """Store `type` (which=ODD_TYPE) or `flags` (ODD_FLAGS): C value when 0..255."""
    cdef long x
    if PyLong_Check(v):
        try:
            x = v
        except OverflowError:
            x = -1
        if 0 <= x <= 255:
            if which == ODD_TYPE:
                f._type = <unsigned char>x
            else:
                f._flags = <unsigned char>x
            return _clear_odd(f, which)
    return _set_odd(f, which, v)


cdef inline object _get_byte(Frame f, int which):
    if f._odd_vals is not None and which in f._odd_vals:
        return f._odd_vals[which]
    return f._type if which == ODD_TYPE else f._flags


cdef void _expand(Frame f, uint64_t *out) noexcept:
    """All int fields as C values into out[MAX_INT_SLOTS] (frame without odd values)."""
    cdef int i
    for i in range(MAX_INT_SLOTS):
        out[i] = 0
    for i in range(f._nints):
        out[f._islot[i]] = f._ival[i]


cdef inline object _get_str(Frame f, int slot):
    if slot == STR_KIND:
        return f._kind
    if slot == STR_TO:
        return f._to
    if slot == STR_TOKEN:
        return f._token
    return f._key


cdef inline void _set_str(Frame f, int slot, object v):
    if slot == STR_KIND:
        f._kind = v
    elif slot == STR_TO:
        f._to = v
    elif slot == STR_TOKEN:
        f._token = v
    else:
        f._key = v


def _rebuild_frame(type, flags, payload, fields):
    """Unpickling helper: Frame(type, flags, payload, **fields)."""
    return Frame(type, flags, payload, **fields)


@cython.final
@cython.freelist(1024)
@cython.no_gc
cdef class Frame:
    """One Tillwire frame (PROTOCOL.md section 3).

    ``Frame(type, flags=0, payload=b"", **fields)``: fields are any names of
    ``codes.INT_FIELDS`` (default 0) and ``codes.STR_FIELDS`` (default "");
    ``lane=`` is ORed into flags.  Values are checked by ``Encoder.encode``,
    not here.  Mutable, so unhashable.
    """

    # No __cinit__: the decoder's _new_frame() and __init__ set the object
    # defaults, which keeps the per-frame allocation path short.

    def __init__(self, type, flags=0, payload=b"", **fields):
        cdef int slot
        lane = None
        self._nints = 0                     # also when __init__ runs again on a frame
        self._odd_vals = None
        _set_byte(self, ODD_TYPE, type)
        self._payload = payload
        self._token = self._to = self._kind = self._key = ""
        for name, value in fields.items():
            s = _FIELD_SLOT.get(name)
            if s is None:
                if name == "lane":
                    lane = value
                    continue
                raise TypeError(f"Frame() got an unexpected keyword argument {name!r}")
            slot = s
            if slot >= 100:
                _set_str(self, slot - 100, value)
            else:
                _set_int(self, slot, value)
        if lane is not None:
            if not isinstance(lane, int):
                raise TypeError(f"lane must be an int, not {lane.__class__.__name__}")  # `type` is the parameter here
            if not 0 <= lane <= F_LANE:
                raise ValueError(f"lane must be 0..{F_LANE}, not {lane}")
            flags = flags | lane
        _set_byte(self, ODD_FLAGS, flags)

    __hash__ = None

    @property
    def type(self):
        return _get_byte(self, ODD_TYPE)

    @type.setter
    def type(self, v):
        _set_byte(self, ODD_TYPE, v)

    @property
    def flags(self):
        return _get_byte(self, ODD_FLAGS)

    @flags.setter
    def flags(self, v):
        _set_byte(self, ODD_FLAGS, v)

    @property
    def lane(self):
        """The priority lane: ``flags & 3`` (read-only)."""
        if self._odd_vals is not None and ODD_FLAGS in self._odd_vals:
            return self._odd_vals[ODD_FLAGS] & F_LANE
        return self._flags & F_LANE

    @property
    def payload(self):
        return self._payload

    @payload.setter
    def payload(self, v):
        self._payload = v

    # String fields ------------------------------------------------------
    @property
    def token(self):
        return self._token

    @token.setter
    def token(self, v):
        self._token = v

    @property
    def to(self):
        return self._to

    @to.setter
    def to(self, v):
        self._to = v

    @property
    def kind(self):
        return self._kind

    @kind.setter
    def kind(self, v):
        self._kind = v

    @property
    def key(self):
        return self._key

    @key.setter
    def key(self, v):
        self._key = v

    # Int fields (slot numbers come from codes.INT_FIELDS) ----------------
    @property
    def version(self):
        return _get_int(self, _I_VERSION)

    @version.setter
    def version(self, v):
        _set_int(self, _I_VERSION, v)

    @property
    def heartbeat(self):
        return _get_int(self, _I_HEARTBEAT)

    @heartbeat.setter
    def heartbeat(self, v):
        _set_int(self, _I_HEARTBEAT, v)

    @property
    def time(self):
        return _get_int(self, _I_TIME)

    @time.setter
    def time(self, v):
        _set_int(self, _I_TIME, v)

    @property
    def max_frame(self):
        return _get_int(self, _I_MAX_FRAME)

    @max_frame.setter
    def max_frame(self, v):
        _set_int(self, _I_MAX_FRAME, v)

    @property
    def epoch(self):
        return _get_int(self, _I_EPOCH)

    @epoch.setter
    def epoch(self, v):
        _set_int(self, _I_EPOCH, v)

    @property
    def p0(self):
        return _get_int(self, _I_P0)

    @p0.setter
    def p0(self, v):
        _set_int(self, _I_P0, v)

    @property
    def p1(self):
        return _get_int(self, _I_P1)

    @p1.setter
    def p1(self, v):
        _set_int(self, _I_P1, v)

    @property
    def seq(self):
        return _get_int(self, _I_SEQ)

    @seq.setter
    def seq(self, v):
        _set_int(self, _I_SEQ, v)

    @property
    def code(self):
        return _get_int(self, _I_CODE)

    @code.setter
    def code(self, v):
        _set_int(self, _I_CODE, v)

    @property
    def delay(self):
        return _get_int(self, _I_DELAY)

    @delay.setter
    def delay(self, v):
        _set_int(self, _I_DELAY, v)

    @property
    def ref(self):
        return _get_int(self, _I_REF)

    @ref.setter
    def ref(self, v):
        _set_int(self, _I_REF, v)

    @property
    def ttl(self):
        return _get_int(self, _I_TTL)

    @ttl.setter
    def ttl(self, v):
        _set_int(self, _I_TTL, v)

    @property
    def msg_id(self):
        return _get_int(self, _I_MSG_ID)

    @msg_id.setter
    def msg_id(self, v):
        _set_int(self, _I_MSG_ID, v)

    @property
    def channel(self):
        return _get_int(self, _I_CHANNEL)

    @channel.setter
    def channel(self, v):
        _set_int(self, _I_CHANNEL, v)

    @property
    def offset(self):
        return _get_int(self, _I_OFFSET)

    @offset.setter
    def offset(self, v):
        _set_int(self, _I_OFFSET, v)

    @property
    def count(self):
        return _get_int(self, _I_COUNT)

    @count.setter
    def count(self, v):
        _set_int(self, _I_COUNT, v)

    # ---------------------------------------------------------------------
    def as_tuple(self):
        """``(type, flags, payload, {field: value})`` over every INT and STR field."""
        cdef int i
        fields = {}
        for i in range(len(_INT_FIELDS)):
            fields[_INT_FIELDS[i]] = _get_int(self, i)
        for name in _STR_FIELDS:
            fields[name] = _get_str(self, _STR_SLOT_OF[name])
        return (_get_byte(self, ODD_TYPE), _get_byte(self, ODD_FLAGS), self._payload, fields)

    def __eq__(self, other):
        cdef Frame o
        cdef uint64_t a[MAX_INT_SLOTS]
        cdef uint64_t b[MAX_INT_SLOTS]
        if not isinstance(other, Frame):
            return NotImplemented
        o = <Frame>other
        if self._odd_vals is not None or o._odd_vals is not None:
            return self.as_tuple() == o.as_tuple()
        _expand(self, a)
        _expand(o, b)
        return (self._type == o._type and self._flags == o._flags
                and memcmp(a, b, sizeof(a)) == 0
                and self._payload == o._payload and self._kind == o._kind
                and self._to == o._to and self._token == o._token and self._key == o._key)

    def __ne__(self, other):
        eq = self.__eq__(other)
        if eq is NotImplemented:
            return eq
        return not eq

    def __reduce__(self):
        return (_rebuild_frame, self.as_tuple())

    def __repr__(self):
        t = _get_byte(self, ODD_TYPE)
        flags = _get_byte(self, ODD_FLAGS)
        names = ()
        if isinstance(t, int):
            if 0 <= t <= 255:
                names = _SCHEMA_NAMES[t]
            try:
                tname = _codes.FrameType(t).name
            except ValueError:
                tname = f"0x{t:02x}"
        else:
            tname = repr(t)
        parts = [tname, f"flags=0x{flags:02x}" if isinstance(flags, int) else f"flags={flags!r}"]
        for name in names:
            parts.append(f"{name}={getattr(self, name)!r}")
        payload = self._payload
        if payload:
            try:
                b = bytes(payload)
            except TypeError:
                parts.append(f"payload={payload!r}")
            else:
                parts.append(f"payload={b[:64]!r}" + (f"...({len(b)} bytes)" if len(b) > 64 else ""))
        return "Frame(" + ", ".join(parts) + ")"


cdef inline Frame _new_frame():
    """A Frame with every field at its default, straight from tp_new (freelist)."""
    cdef Frame f = Frame.__new__(Frame)
    f._payload = b""
    f._token = f._to = f._kind = f._key = ""
    return f


cdef Frame new_frame():
    return _new_frame()


cdef object frame_get_int(Frame f, int slot):
    if not 0 <= slot < len(_INT_FIELDS):
        raise IndexError(f"int field slot {slot} out of range")
    return _get_int(f, slot)


cdef int frame_set_int(Frame f, int slot, object v) except -1:
    if not 0 <= slot < len(_INT_FIELDS):
        raise IndexError(f"int field slot {slot} out of range")
    return _set_int(f, slot, v)


# ---------------------------------------------------------------------------
# Decoder


def _check_limit(max_frame_size):
    if not isinstance(max_frame_size, int):
        raise TypeError("max_frame_size must be an int")
    if not MIN_LIMIT <= max_frame_size <= MAX_LIMIT:
        raise ValueError(f"max_frame_size must be in [{MIN_LIMIT}, {MAX_LIMIT}], got {max_frame_size}")
    return max_frame_size


@cython.final
cdef class Decoder:
    """Streaming frame decoder (PROTOCOL.md section 16).

    ``feed(data)`` returns the frames completed by ``data``; any chunking of
    a stream yields the same frames.  On malformed input it raises
    ``ProtocolError(code, message, frames=<frames completed earlier in the same
    call>)`` and the decoder stays failed.  Not thread-safe.
    """

    def __cinit__(self):
        self._pbuf = NULL
        self._pcap = 0
        self._plen = 0
        self._need = 0
        self._hdr = 0
        self._fail_code = -1
        self._fail_msg = ""
        self._err_code = 0
        self._err_msg = ""
        self._busy = False

    def __init__(self, max_frame_size=_codes.DEFAULT_MAX_FRAME_SIZE):
        self._max = _check_limit(max_frame_size)

    def __dealloc__(self):
        PyMem_Free(self._pbuf)
        self._pbuf = NULL

    @property
    def buffered(self):
        """Bytes held for an incomplete frame (at most max_frame_size + 4)."""
        return self._plen

    @property
    def failed(self):
        """True once feed() has raised a ProtocolError."""
        return self._fail_code >= 0

    @property
    def max_frame_size(self):
        return self._max

    def feed(self, data):
        """Decode the frames completed by ``data`` (bytes-like); see the class doc."""
        cdef Py_buffer view
        cdef bint have_view = False
        cdef const uchar *p
        cdef Py_ssize_t n
        cdef list frames
        cdef int rc
        if self._fail_code >= 0:
            raise ProtocolError(self._fail_code, "decoder failed earlier: " + self._fail_msg, [])
        if self._busy:
            raise RuntimeError("Decoder.feed() is not re-entrant")
        if not PyBytes_CheckExact(data):
            if PyObject_CheckBuffer(data):
                try:
                    # Holding the export also stops a bytearray from being resized under us.
                    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
                    have_view = True
                except BufferError:         # e.g. a non-contiguous memoryview: copy it
                    data = memoryview(data).tobytes()
            else:
                raise TypeError(f"feed() needs a bytes-like object, not {type(data).__name__}")
        if have_view:
            p = <const uchar *>view.buf
            n = view.len
        else:
            p = <const uchar *>PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
        frames = []
        self._busy = True
        try:
            rc = self._feed(p, n, frames)
        finally:
            self._busy = False
            if have_view:
                PyBuffer_Release(&view)
        if rc:
            self._fail_code = self._err_code
            self._fail_msg = self._err_msg
            PyMem_Free(self._pbuf)
            self._pbuf = NULL
            self._pcap = self._plen = self._need = 0
            raise ProtocolError(self._err_code, self._err_msg, frames)
        return frames

    cdef int _reserve(self, Py_ssize_t n) except -1:
        cdef uchar *nb
        if n <= self._pcap:
            return 0
        if n < 64:
            n = 64
        nb = <uchar *>PyMem_Realloc(self._pbuf, <size_t>n)
        if nb == NULL:
            raise MemoryError()
        self._pbuf = nb
        self._pcap = n
        return 0

    cdef void _trim(self) noexcept:
        if self._pcap > PBUF_KEEP:
            PyMem_Free(self._pbuf)
            self._pbuf = NULL
            self._pcap = 0

    cdef int _error(self, int code, str msg) except -1:
        self._err_code = code
        self._err_msg = msg
        return 1

    cdef int _feed(self, const uchar *data, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t pos = 0, take, length = 0, plen = 0
        cdef int rc
        if self._plen:
            # Finish the pending frame, taking from `data` only what it lacks.
            if self._need == 0:
                while pos < n:
                    self._pbuf[self._plen] = data[pos]   # _pcap >= 64 > 4 prefix bytes
                    self._plen += 1
                    pos += 1
                    rc = _parse_prefix(self._pbuf, self._plen, self._max, &length, &plen)
                    if rc == PREFIX_INCOMPLETE:
                        continue
                    if rc:
                        return self._error(rc, _prefix_message(rc, length))
                    self._hdr = plen
                    self._need = plen + length
                    self._reserve(self._need)
                    break
                if self._need == 0:
                    return 0
            take = self._need - self._plen
            if take > n - pos:
                take = n - pos
            memcpy(self._pbuf + self._plen, data + pos, <size_t>take)
            self._plen += take
            pos += take
            if self._plen < self._need:
                return 0
            rc = self._decode_frame(self._pbuf + self._hdr, self._need - self._hdr, out)
            self._plen = 0
            self._need = 0
            self._trim()
            if rc:
                return rc
        while pos < n:
            rc = _parse_prefix(data + pos, n - pos, self._max, &length, &plen)
            if rc == 0 and length <= n - pos - plen:
                rc = self._decode_frame(data + pos + plen, length, out)
                if rc:
                    return rc
                pos += plen + length
                continue
            if rc != PREFIX_INCOMPLETE and rc != 0:
                return self._error(rc, _prefix_message(rc, length))
            # Incomplete: keep the tail (at most one frame, <= limit + 4 bytes).
            if rc == 0:
                self._need = plen + length
                self._hdr = plen
                self._reserve(self._need)
            else:
                self._need = 0
                self._reserve(4)
            memcpy(self._pbuf, data + pos, <size_t>(n - pos))
            self._plen = n - pos
            return 0
        return 0

    cdef int _decode_frame(self, const uchar *p, Py_ssize_t n, list out) except -1:
        cdef const uchar *end = p + n
        cdef int t = p[0]
        cdef int fl = p[1]
        cdef int i, k, rc, ni = 0
        cdef Schema *sc = &_SCHEMAS[t]
        cdef Frame f
        cdef uint64_t v = 0, size = 0
        cdef object s, payload
        if sc.known != KNOWN_CORE:
            if sc.known == KNOWN_NONE:
                return self._error(C_UNKNOWN_FRAME, f"unknown frame type 0x{t:02x}")
            f = _new_frame()
            f._type = t
            f._flags = fl
            f._payload = PyBytes_FromStringAndSize(<const char *>p + 2, n - 2)
            PyList_Append(out, f)
            return 0
        if fl & ~sc.allowed:
            return self._error(C_BAD_FLAGS, f"flags 0x{fl:02x} not allowed on frame type 0x{t:02x}")
        f = _new_frame()
        f._type = t
        f._flags = fl
        p += 2
        for i in range(sc.nfields):
            k = sc.kind[i]
            if k == FK_U:
                # A fresh frame has no int entries: the schema's int fields
                # fill entries 0.. in wire order (at most INLINE_INTS).
                rc = _read_uvarint(&p, end, &f._ival[ni])
                if rc:
                    return self._error(rc, _field_message(rc, t, i))
                f._islot[ni] = <unsigned char>sc.slot[i]
                ni += 1
                f._nints = ni
            elif k == FK_K:
                rc = _read_uvarint(&p, end, &v)
                if rc:
                    return self._error(rc, _field_message(rc, t, i))
                if v != 0:
                    if v > _MAX_KIND_CODE or _KIND_NAMES[v] == NULL:
                        return self._error(C_BAD_KIND, f"unregistered kind code {v}")
                    f._kind = <object>_KIND_NAMES[v]
                else:
                    rc = _read_uvarint(&p, end, &size)
                    if rc:
                        return self._error(rc, _field_message(rc, t, i))
                    if size > <uint64_t>(end - p):
                        return self._error(C_MALFORMED, _field_message(C_MALFORMED, t, i))
                    s = _utf8(p, <Py_ssize_t>size)
                    if s is None:
                        return self._error(C_BAD_UTF8, _field_message(C_BAD_UTF8, t, i))
                    if size == 0 or size > <uint64_t>MAX_KIND_LEN:
                        return self._error(C_BAD_KIND, f"inline kind name of {size} bytes (1 to {MAX_KIND_LEN} allowed)")
                    p += size
                    f._kind = s
            else:
                rc = _read_uvarint(&p, end, &size)
                if rc:
                    return self._error(rc, _field_message(rc, t, i))
                if size > <uint64_t>(end - p):
                    return self._error(C_MALFORMED, _field_message(C_MALFORMED, t, i))
                s = _utf8(p, <Py_ssize_t>size)
                if s is None:
                    return self._error(C_BAD_UTF8, _field_message(C_BAD_UTF8, t, i))
                p += size
                _set_str(f, sc.slot[i], s)
        if fl & F_COMPRESSED:
            rc = _read_uvarint(&p, end, &size)
            if rc:
                return self._error(rc, "compressed payload: original_size " + (
                    "missing or truncated" if rc == C_MALFORMED else "is a bad varint"))
            if size > <uint64_t>self._max:
                return self._error(C_FRAME_TOO_LARGE, f"compressed payload: original_size {size} above the frame limit {self._max}")
            if size == 0:
                return self._error(C_BAD_COMPRESSION, "compressed payload: original_size 0")
            # A read-only view over our own bytes: no copy of the block.  It
            # stays valid while lz4 runs without the GIL: the input is held
            # by feed() and _pbuf cannot move (a re-entrant feed() raises).
            block = PyMemoryView_FromMemory(<char *>p, end - p, PyBUF_READ)
            try:
                # decompress(source, uncompressed_size): positional, which
                # skips lz4's keyword parsing on this per-frame call.
                payload = _lz4_decompress(block, <Py_ssize_t>size)
            except _LZ4_ERRORS as exc:
                return self._error(C_BAD_COMPRESSION, f"compressed payload: invalid lz4 block ({exc})")
            finally:
                block.release()
            if not PyBytes_CheckExact(payload) or PyBytes_GET_SIZE(payload) != <Py_ssize_t>size:
                return self._error(C_BAD_COMPRESSION, f"compressed payload: block does not decompress to {size} bytes")
            f._flags = fl & ~F_COMPRESSED
            f._payload = payload
        else:
            f._payload = PyBytes_FromStringAndSize(<const char *>p, end - p)
        PyList_Append(out, f)
        return 0


_CODE_NAMES = {int(c): c.name for c in _codes.Code}


def _prefix_message(int rc, Py_ssize_t length):
    if rc == C_BAD_VARINT:
        return "non-canonical length prefix"
    if rc == C_MALFORMED:
        return f"frame length {length} below 2"
    return "frame length above the frame limit"


def _field_message(int rc, int t, int i):
    name = _SCHEMA_NAMES[t][i]
    try:
        tname = _codes.FrameType(t).name
    except ValueError:
        tname = f"0x{t:02x}"
    what = {C_MALFORMED: "runs past the end of the frame", C_BAD_VARINT: "is a bad varint",
            C_BAD_UTF8: "is not valid UTF-8"}.get(rc, _CODE_NAMES.get(rc, str(rc)))
    return f"{tname}.{name} {what}"


# ---------------------------------------------------------------------------
# Encoder


ctypedef struct Prep:
    int type                              # type byte
    int flags                             # flags byte as written (COMPRESSED decided by the encoder)
    int nfields
    int kind[MAX_SCHEMA_FIELDS]           # FK_U / FK_S / FK_K
    uint64_t v[MAX_SCHEMA_FIELDS]         # FK_U value; FK_K code (0 = inline name in s/slen)
    const char *s[MAX_SCHEMA_FIELDS]      # FK_S / inline FK_K: UTF-8 bytes (owned by a str kept alive by the caller)
    Py_ssize_t slen[MAX_SCHEMA_FIELDS]
    const char *payload                   # bytes written after the fields (the lz4 block when compressed)
    Py_ssize_t plen
    uint64_t orig                         # 0: not compressed; else the original size written before the block
    Py_ssize_t body                       # the length field


cdef uint64_t _odd_int(str name, object v) except? 0xffffffffffffffff:
    """The C value of an int field held as an object, or TypeError / ValueError."""
    if not isinstance(v, int):
        raise TypeError(f"field {name!r} must be an int, not {type(v).__name__}")
    if not 0 <= v < 2**64:
        raise ValueError(f"field {name!r} out of range [0, 2**64): {v!r}")
    return v


# One-entry cache of the last registered kind looked up by identity: frames
# are usually built from the same str object (a constant, or a decoded
# frame's interned name), which then skips the dict lookup and string compare.
cdef object _last_kind = None
cdef uint64_t _last_code = 0


cdef object _prepare(Frame f, Py_ssize_t limit, Py_ssize_t threshold, Prep *st):
    """Validate `f` and fill `st` with everything _write needs.

    Returns None or a list of objects that must stay alive until `st` is
    written (str copies, the payload copy, the lz4 block).  Raises ValueError
    / TypeError / ProtocolError(FRAME_TOO_LARGE) as in CODEC_API.md.
    """
    cdef dict odd = f._odd_vals
    cdef int t, fl, i, k, slot
    cdef Schema *sc
    cdef Py_ssize_t body = 2, n
    cdef uint64_t v
    global _last_kind, _last_code
    cdef object keep = None, s, pl
    cdef PyObject *cp
    if odd is not None and (ODD_TYPE in odd or ODD_FLAGS in odd):
        # Slow path: a type or flags value that is not a byte.  Order: the
        # TypeErrors first, then the ValueErrors (as the Python twin).
        tv = _get_byte(f, ODD_TYPE)
        fv = _get_byte(f, ODD_FLAGS)
        if not isinstance(tv, int):
            raise TypeError(f"type must be an int, not {type(tv).__name__}")
        if not isinstance(fv, int):
            raise TypeError(f"flags must be an int, not {type(fv).__name__}")
        if ODD_TYPE in odd:
            raise ValueError(f"frame type {tv!r} is neither a core nor an extension type")
        raise ValueError(f"flags {fv:#x} not allowed on frame type 0x{f._type:02x}")
    t = f._type
    sc = &_SCHEMAS[t]
    if sc.known == KNOWN_NONE:
        raise ValueError(f"frame type 0x{t:02x} is neither a core nor an extension type")
    fl = f._flags
    st.type = t
    st.nfields = 0
    if sc.known == KNOWN_CORE:
        fl &= ~F_COMPRESSED
        if fl & ~sc.allowed:
            raise ValueError(f"flags 0x{fl:02x} not allowed on frame type 0x{t:02x}")
        st.nfields = sc.nfields
        for i in range(sc.nfields):
            k = sc.kind[i]
            slot = sc.slot[i]
            st.kind[i] = k
            if k == FK_U:
                if odd is not None and slot in odd:
                    v = _odd_int(_SCHEMA_NAMES[t][i], odd[slot])
                else:
                    v = _int_of(f, slot)
                st.v[i] = v
                body += _uvarint_size(v)
                continue
            s = _get_str(f, slot)
            if not PyUnicode_CheckExact(s):
                if not PyUnicode_Check(s):
                    raise TypeError(f"field {_SCHEMA_NAMES[t][i]!r} must be a str, not {type(s).__name__}")
                s = PyUnicode_FromObject(s)      # exact str: no user __hash__/__eq__ below
                if keep is None:
                    keep = []
                keep.append(s)
            if k == FK_S:
                st.s[i] = PyUnicode_AsUTF8AndSize(s, &n)
                st.slen[i] = n
                body += _uvarint_size(<uint64_t>n) + n
                continue
            if PyUnicode_GET_LENGTH(s) == 0:
                raise ValueError(f"frame type 0x{t:02x} needs a non-empty kind")
            if s is _last_kind:
                cp = <PyObject *>s              # only tested against NULL below
                v = _last_code
            else:
                cp = PyDict_GetItemWithError(_KIND_CODE, s)
                if cp != NULL:
                    v = <object>cp
                    _last_kind = s
                    _last_code = v
            if cp != NULL:
                st.v[i] = v
                st.s[i] = NULL
                body += _uvarint_size(v)
            else:
                st.s[i] = PyUnicode_AsUTF8AndSize(s, &n)
                if n > MAX_KIND_LEN:
                    raise ValueError(f"inline kind name of {n} bytes (at most {MAX_KIND_LEN})")
                st.v[i] = 0
                st.slen[i] = n
                body += 1 + _uvarint_size(<uint64_t>n) + n
    pl = f._payload
    if not PyBytes_CheckExact(pl):
        if not isinstance(pl, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(pl).__name__}")
        pl = bytes(pl)
        if keep is None:
            keep = []
        keep.append(pl)
    n = PyBytes_GET_SIZE(pl)
    if n > limit:
        raise ProtocolError(C_FRAME_TOO_LARGE, f"payload of {n} bytes above the frame limit {limit}")
    st.payload = PyBytes_AS_STRING(pl)
    st.plen = n
    st.orig = 0
    if sc.known == KNOWN_CORE and threshold > 0 and n >= threshold:
        # lz4 may release the GIL: pin every str whose UTF-8 `st` points into.
        if keep is None:
            keep = []
        keep += [f._token, f._to, f._kind, f._key, pl]
        block = _lz4_compress(pl, store_size=False)
        if _uvarint_size(<uint64_t>n) + len(block) < n:
            keep.append(block)
            st.orig = <uint64_t>n
            st.payload = PyBytes_AS_STRING(block)
            st.plen = PyBytes_GET_SIZE(block)
            body += _uvarint_size(<uint64_t>n)
            fl |= F_COMPRESSED
    body += st.plen
    if body > limit:
        raise ProtocolError(C_FRAME_TOO_LARGE, f"frame length {body} above the frame limit {limit}")
    st.flags = fl
    st.body = body
    return keep


cdef char *_write(const Prep *st, char *w) noexcept nogil:
    """Write the frame described by `st` at w (exactly _uvarint_size(body) + body bytes)."""
    cdef int i, k
    w = _put_uvarint(w, <uint64_t>st.body)
    w[0] = <char>st.type
    w[1] = <char>st.flags
    w += 2
    for i in range(st.nfields):
        k = st.kind[i]
        if k == FK_U or (k == FK_K and st.s[i] == NULL):
            w = _put_uvarint(w, st.v[i])
        else:
            if k == FK_K:
                w[0] = 0
                w += 1
            w = _put_uvarint(w, <uint64_t>st.slen[i])
            memcpy(w, st.s[i], <size_t>st.slen[i])
            w += st.slen[i]
    if st.orig:
        w = _put_uvarint(w, st.orig)
    memcpy(w, st.payload, <size_t>st.plen)
    return w + st.plen


@cython.final
cdef class Encoder:
    """Frame encoder (PROTOCOL.md sections 3, 6, 7, 13).

    ``encode(frame) -> bytes``; ``encode_batch(frames) -> bytes`` (one buffer,
    == b"".join(encode(f) for f in frames)); ``encode_deliver``,
    ``encode_broadcast`` and ``encode_sendack`` build and encode the three hot
    frame types directly.
    """

    def __init__(self, max_frame_size=_codes.DEFAULT_MAX_FRAME_SIZE,
                 compress_threshold=_codes.DEFAULT_COMPRESS_THRESHOLD):
        self._max = _check_limit(max_frame_size)
        if not isinstance(compress_threshold, int):
            raise TypeError("compress_threshold must be an int")
        if compress_threshold < 0:
            raise ValueError(f"compress_threshold must be >= 0, got {compress_threshold}")
        self._threshold_obj = compress_threshold
        # Any threshold above the largest payload behaves the same in C.
        self._threshold = min(compress_threshold, MAX_LIMIT + 1)

    @property
    def max_frame_size(self):
        return self._max

    @property
    def compress_threshold(self):
        return self._threshold_obj

    cdef bytes _encode_one(self, Frame f):
        cdef Prep st
        cdef bytes out
        cdef Py_ssize_t total
        keep = _prepare(f, self._max, self._threshold, &st)
        total = _uvarint_size(<uint64_t>st.body) + st.body
        out = PyBytes_FromStringAndSize(NULL, total)
        _write(&st, PyBytes_AS_STRING(out))
        return out

    cdef Py_ssize_t _append(self, object frame, PyObject **out, Py_ssize_t used) except -1:
        cdef Prep st
        cdef Frame f
        cdef Py_ssize_t total, cap
        if type(frame) is not Frame:
            raise TypeError(f"encode() needs a Frame, not {type(frame).__name__}")
        f = <Frame>frame
        keep = _prepare(f, self._max, self._threshold, &st)
        total = _uvarint_size(<uint64_t>st.body) + st.body
        cap = _bytes_size(out[0])
        if used + total > cap:
            cap *= 2
            if cap < used + total:
                cap = used + total
            # On failure this frees *out, sets it to NULL and raises MemoryError.
            _PyBytes_Resize(out, cap)
        _write(&st, _bytes_data(out[0]) + used)
        return used + total

    def encode(self, frame):
        """Encode one frame; ValueError/TypeError/ProtocolError(FRAME_TOO_LARGE) on a bad frame."""
        if type(frame) is not Frame:
            raise TypeError(f"encode() needs a Frame, not {type(frame).__name__}")
        return self._encode_one(<Frame>frame)

    def encode_batch(self, frames):
        """Encode every frame of the iterable into one bytes object.

        Writes straight into a bytes object grown by doubling (realloc; big
        blocks move by mremap, not by copying) and trimmed at the end, so the
        output is never copied.
        """
        cdef PyObject *out = _new_bytes(NULL, BATCH_START)
        cdef Py_ssize_t used = 0
        try:
            for frame in frames:
                used = self._append(frame, &out, used)
            _PyBytes_Resize(&out, used)
            result = <object>out
        finally:
            Py_XDECREF(out)
        return result

    def encode_deliver(self, lane, flags, seq, msg_id, kind, payload):
        """== encode(Frame(DELIVER, flags | lane, seq=seq, msg_id=msg_id, kind=kind, payload=payload))."""
        cdef Frame f = _new_frame()
        f._type = T_DELIVER
        _set_byte(f, ODD_FLAGS, flags | lane)
        _set_int(f, _I_SEQ, seq)
        _set_int(f, _I_MSG_ID, msg_id)
        f._kind = kind
        f._payload = payload
        return self._encode_one(f)

    def encode_sendack(self, flags, ref, msg_id, payload):
        """== encode(Frame(SENDACK, flags, ref=ref, msg_id=msg_id, payload=payload))."""
        cdef Frame f = _new_frame()
        f._type = T_SENDACK
        _set_byte(f, ODD_FLAGS, flags)
        _set_int(f, _I_REF, ref)
        _set_int(f, _I_MSG_ID, msg_id)
        f._payload = payload
        return self._encode_one(f)

    def encode_broadcast(self, lane, flags, channel, offset, kind, payload):
        """== encode(Frame(BROADCAST, flags | lane, channel=..., offset=..., kind=..., payload=...))."""
        cdef Frame f = _new_frame()
        f._type = T_BROADCAST
        _set_byte(f, ODD_FLAGS, flags | lane)
        _set_int(f, _I_CHANNEL, channel)
        _set_int(f, _I_OFFSET, offset)
        f._kind = kind
        f._payload = payload
        return self._encode_one(f)

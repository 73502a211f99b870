# cython: language_level=3
"""Declarations of the native frame codec (core/_codec.pyx).

Other native modules cimport these (``from tillwire.core._codec cimport
Frame``) to build and read frames without Python attribute lookups.  The wire
format is PROTOCOL.md sections 2-4, 6, 7, 13 and 16; every constant (types,
flags, codes, kinds, the per-type field layout) is read from core/codes.py when
the module is imported, nothing here spells one.

Error contracts: ``except -1`` functions return -1 with a Python exception
set.  Decoder functions that can meet malformed input return 1 instead of
raising and leave the protocol error in ``_err_code``/``_err_msg``: the caller
(``feed``) raises it with the frames completed so far.
"""

from cpython.ref cimport PyObject
from libc.stdint cimport uint64_t

cdef enum:
    MAX_INT_SLOTS = 16      # int field slots (codes.INT_FIELDS order); import fails if there are more
    INLINE_INTS = 5         # int fields a Frame holds in C; import fails if a schema has more
    MAX_SCHEMA_FIELDS = 8   # capacity of a type's field list in the schema table


# One frame, 112 bytes.  The 16 int fields are sparse: most are 0, and a
# decoded frame sets at most INLINE_INTS (the schema's), so they are kept as
# (slot, value) entries in _islot/_ival; an absent slot reads 0.  A value with
# no C representation (negative, >= 2**64, not an int, a type/flags that is
# not a byte, or a 6th non-zero int field) is still accepted on assignment and
# kept as the object in _odd_vals; Encoder.encode then reports it (ValueError
# / TypeError) exactly as the Python twin does.  Size matters: decoding a
# large buffer is dominated by touching fresh memory (page faults).
# Not GC-tracked (cython.no_gc): a frame only refers to str/bytes/int, and a
# cycle through one needs a deliberate misuse such as ``f.to = f``, which then
# leaks instead of being collected.
cdef class Frame:
    cdef unsigned char _type         # type byte, unless _odd_vals has ODD_TYPE
    cdef unsigned char _flags        # flags byte, unless _odd_vals has ODD_FLAGS
    cdef unsigned char _nints        # entries used in _islot/_ival (0..INLINE_INTS)
    cdef unsigned char _islot[INLINE_INTS]  # int slot (index in codes.INT_FIELDS) of each entry; no duplicates
    cdef dict _odd_vals              # None, or {slot / ODD_TYPE / ODD_FLAGS: object} overriding the C values
    cdef uint64_t _ival[INLINE_INTS] # value of each entry
    cdef object _payload             # bytes after decode (decompressed); any object on assignment, checked by encode
    cdef object _token               # STR field "token" ("" when absent)
    cdef object _to                  # STR field "to"
    cdef object _kind                # STR field "kind": the kind *name*, registered or inline
    cdef object _key                 # STR field "key"


# C-level access for other native modules (cimport these with Frame); `slot` is
# an index in codes.INT_FIELDS.  type/flags/payload/kind/to/token/key are the
# C fields above (type/flags only when _odd_vals is None).
cdef Frame new_frame()                                           # a Frame with every field at its default (type 0), freelist-backed
cdef object frame_get_int(Frame f, int slot)                     # int field value, 0 when absent (never NULL without an exception)
cdef int frame_set_int(Frame f, int slot, object v) except -1    # same rules as the attribute setter


# Streaming decoder: parses straight from the caller's buffer; only the bytes
# of one incomplete frame (<= max_frame_size + 4) are ever copied into _pbuf.
cdef class Decoder:
    cdef Py_ssize_t _max             # frame limit: largest accepted length field
    cdef unsigned char *_pbuf        # the incomplete frame's bytes so far (PyMem_Malloc'ed or NULL)
    cdef Py_ssize_t _pcap            # bytes allocated at _pbuf
    cdef Py_ssize_t _plen            # bytes held at _pbuf (the `buffered` property)
    cdef Py_ssize_t _need            # whole size (prefix + length) of that frame; 0 while its prefix is incomplete
    cdef Py_ssize_t _hdr             # size of that frame's length prefix (valid when _need > 0)
    cdef int _fail_code              # -1 while healthy, else the code of the error that failed the decoder
    cdef object _fail_msg            # message of that error
    cdef int _err_code               # scratch: code of the protocol error just met (see module docstring)
    cdef object _err_msg             # scratch: its message
    cdef bint _busy                  # inside feed(); a re-entrant call (lz4 releases the GIL) raises RuntimeError

    cdef int _feed(self, const unsigned char *data, Py_ssize_t n, list out) except -1   # 0 ok, 1 protocol error
    cdef int _decode_frame(self, const unsigned char *p, Py_ssize_t n, list out) except -1   # p: type byte, n: length field; 0 ok, 1 protocol error
    cdef int _error(self, int code, str msg) except -1   # records the error, returns 1
    cdef int _reserve(self, Py_ssize_t n) except -1      # _pbuf holds at least n bytes
    cdef void _trim(self) noexcept                       # drops an oversized _pbuf after a frame completed


# Encoder: validates a frame against its type's schema and writes it in one
# pass over precomputed sizes (no intermediate objects for uncompressed
# frames).  Stateless apart from its settings, so it is re-entrant.
cdef class Encoder:
    cdef Py_ssize_t _max             # frame limit for the length field and the uncompressed payload
    cdef Py_ssize_t _threshold       # compress payloads of at least this many bytes; 0 = never (clamped to MAX_FRAME_SIZE_LIMIT + 1)
    cdef object _threshold_obj       # the compress_threshold as given (the property)

    # Appends one frame at offset `used` of the bytes object *out (refcount 1,
    # grown with _PyBytes_Resize, which may move it); returns the new `used`.
    cdef Py_ssize_t _append(self, object frame, PyObject **out, Py_ssize_t used) except -1
    cdef bytes _encode_one(self, Frame f)    # one frame as an exact-size bytes object

# Types for the compiled build of splice.py (setup.py; the Python module ignores this file).
cdef class Cut:
    cdef public bytes _after_volume, _first, eid_colon, fixed_head, middle, tail
    cdef public dict prefixes, rests
    cdef public str tag


cdef class LinkBytes:
    cdef public bytes ident, symbol
    cdef public Py_ssize_t link_len


cdef class Batches:
    cdef public dict chunks
    cdef public list holes
    cdef public set placed
    cdef public str tag

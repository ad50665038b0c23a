# Types for the compiled build of fanout.py (Cython reads them beside the module; the pure
# Python module ignores this file). Only the per-link hot loops are typed.
cimport cython

from engine.replicator.splice cimport Batches, Cut, LinkBytes


cdef class LinkProgram:
    cdef public object cl, link_cap, max_open_positions, max_signal_age_ms, spec, state
    cdef public bint copy_modifications, copy_partial_closes, copy_pending
    cdef public bint cut_follow_up, cut_new, follow_up_fast, open_fast, pending_fast
    cdef public bint spec_full, splice_follow_up, splice_new
    cdef public double cap, factor, volume_min, volume_step
    cdef public Py_ssize_t follow_up_shape, new_copy_shape, sizing_group, sizing_kind
    cdef public str connector, follower, link_id, symbol
    cdef public tuple spec_key
    cdef public LinkBytes wire


cdef class _Rounding:
    cdef public double step, volume
    cdef public bytes encoded


@cython.locals(
    p=LinkProgram, c=Cut, last_cut=Cut, w=LinkBytes, volume=cython.double,
    age_ms=cython.double, master_volume=cython.double, step=cython.double,
    kind=Py_ssize_t, shape=Py_ssize_t, last_len=Py_ssize_t, is_pending=cython.bint,
    accounts=dict, symbols=dict, on_step=dict, by_connector=dict, templates=list, cuts=list,
    chunks=list, plans=list, encoded=bytes, prefixes=dict, prefix=bytes,
    rest=bytes, last_symbol=bytes, connector=str, last_connector=str, group=Py_ssize_t,
    roundings=list, group_prefixes=list, rounding=_Rounding, memo=tuple, inf=cython.double,
    fixed=Py_ssize_t, multiplier=Py_ssize_t,
)
cpdef list _plan_new_copies(
    event, facts, programs, Py_ssize_t shapes, Py_ssize_t groups, view, now_ns, trace, batches
)


@cython.locals(
    p=LinkProgram, c=Cut, last_cut=Cut, w=LinkBytes, shape=Py_ssize_t, last_len=Py_ssize_t,
    reduced=cython.bint, modified=cython.bint, pending_change=cython.bint, accounts=dict,
    by_connector=dict, templates=list, cuts=list, chunks=list, plans=list,
    prefix=bytes, rest=bytes, last_symbol=bytes, connector=str, last_connector=str,
)
cpdef list _plan_follow_ups(event, facts, programs, Py_ssize_t shapes, view, now_ns, trace, batches)

"""Build ``apptrace._blazepack``: a small C helper (cffi out-of-line API mode)
that turns one blazesym result into flat arrays.

Why: reading a ``blaze_syms`` result field by field through cffi's ABI mode
costs about 3 us per frame; a warm blazesym call costs about 0.4 us per
address. This helper walks the result in C, interns the strings (a result
repeats each function, file and module name once per address), and hands
back per-frame columns that Python turns into frames with C-speed loops.

It does not call blazesym and is not linked against it: it only reads the
result structs, whose layout is the cdef in :mod:`apptrace.symbolize` (the
same one the ABI-mode binding trusts and a unit test checks against the
header). Without the helper, :mod:`apptrace.symbolize` falls back to reading
the result in ABI mode: same frames, slower.

Built by ``make blazepack`` (``python apptrace/_blazepack_build.py``); needs a
C compiler and the Python headers.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from apptrace.symbolize import _CDEF_TYPES  # noqa: E402

PACK_CDEF = """
size_t apptrace_frame_count(const struct blaze_syms *res);
int apptrace_pack(const struct blaze_syms *res, const uint64_t *inputs, const uint8_t *adjust,
                  int singles_first, size_t nframes, uint64_t *addrs, uint64_t *offsets,
                  uint32_t *lines, uint32_t *where_ids, uint64_t *keys, uint32_t *groups,
                  const char **strs, uint8_t *kinds, uint32_t *paths, uint32_t *wheres,
                  size_t *sizes);
"""

PACK_C = r"""
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
""" + _CDEF_TYPES + r"""
/* String kinds: decoded differently on the Python side. */
#define AT_NAME 1
#define AT_MODULE 2
#define AT_PART 3   /* a directory or file name: joined into a path */

struct at_ctx {
    /* The previous string looked up per kind: a result repeats its module
       and source file for address after address, so one strcmp usually
       answers without hashing. */
    const char *last[4];
    uint32_t last_id[4];
    size_t mask;
    uint32_t *str_slots, *path_slots, *where_slots;  /* open addressing; 0 = empty */
    uint64_t *str_hash;
    const char **strs;     /* id -> string (1-based) */
    uint8_t *kinds;
    size_t nstr;
    uint32_t *paths;       /* id -> (dir id, file id) */
    size_t npath;
    uint32_t *wheres;      /* id -> (name id, path id, module id, inlined, reason) */
    size_t nwhere;
};

static uint64_t at_mix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 33);
}

static uint32_t at_str(struct at_ctx *c, const char *s, uint8_t kind)
{
    uint64_t h = 1469598103934665603ULL ^ kind;
    const unsigned char *p;
    size_t i;

    if (s == NULL)
        return 0;
    if (c->last[kind] != NULL && strcmp(c->last[kind], s) == 0)
        return c->last_id[kind];
    for (p = (const unsigned char *)s; *p; p++)
        h = (h ^ *p) * 1099511628211ULL;
    for (i = at_mix(h) & c->mask;; i = (i + 1) & c->mask) {
        uint32_t id = c->str_slots[i];
        if (id == 0)
            break;
        if (c->str_hash[id] == h && c->kinds[id] == kind
                && (c->strs[id] == s || strcmp(c->strs[id], s) == 0)) {
            c->last[kind] = s;
            c->last_id[kind] = id;
            return id;
        }
    }
    c->nstr++;
    c->strs[c->nstr] = s;
    c->kinds[c->nstr] = kind;
    c->str_hash[c->nstr] = h;
    c->str_slots[i] = (uint32_t)c->nstr;
    c->last[kind] = s;
    c->last_id[kind] = (uint32_t)c->nstr;
    return (uint32_t)c->nstr;
}

static uint32_t at_path(struct at_ctx *c, const struct blaze_symbolize_code_info *ci)
{
    uint32_t file = at_str(c, ci->file, AT_PART), dir;
    size_t i;

    if (file == 0)
        return 0;
    dir = at_str(c, ci->dir, AT_PART);
    for (i = at_mix(((uint64_t)dir << 32) | file) & c->mask;; i = (i + 1) & c->mask) {
        uint32_t id = c->path_slots[i];
        if (id == 0)
            break;
        if (c->paths[2 * id] == dir && c->paths[2 * id + 1] == file)
            return id;
    }
    c->npath++;
    c->paths[2 * c->npath] = dir;
    c->paths[2 * c->npath + 1] = file;
    c->path_slots[i] = (uint32_t)c->npath;
    return (uint32_t)c->npath;
}

static uint32_t at_where(struct at_ctx *c, uint32_t name, uint32_t path, uint32_t module,
                         uint32_t inlined, uint32_t reason)
{
    uint32_t key[5] = {name, path, module, inlined, reason};
    uint64_t h = at_mix(((uint64_t)name << 32) ^ path ^ ((uint64_t)module << 20)
                        ^ ((uint64_t)inlined << 62) ^ ((uint64_t)reason << 54));
    size_t i;

    for (i = h & c->mask;; i = (i + 1) & c->mask) {
        uint32_t id = c->where_slots[i];
        if (id == 0)
            break;
        if (memcmp(&c->wheres[5 * id], key, sizeof key) == 0)
            return id;
    }
    c->nwhere++;
    memcpy(&c->wheres[5 * c->nwhere], key, sizeof key);
    c->where_slots[i] = (uint32_t)c->nwhere;
    return (uint32_t)c->nwhere;
}

/* Frames the result holds: each address gives its inlined functions plus
   the function itself (or one frame saying why it has none). */
size_t apptrace_frame_count(const struct blaze_syms *res)
{
    size_t n = 0, i;

    for (i = 0; i < res->cnt; i++)
        n += 1 + (res->syms[i].name != NULL ? res->syms[i].inlined_cnt : 0);
    return n;
}

struct at_out {
    const uint64_t *inputs;
    const uint8_t *adjust;
    size_t nframes, k, g;
    uint64_t *addrs, *offsets, *keys;
    uint32_t *lines, *where_ids, *groups;
};

/* One address's frames, innermost first; its group size and key. */
static void at_emit(struct at_ctx *c, struct at_out *o, const struct blaze_sym *s, size_t i)
{
    uint8_t adj = o->adjust != NULL ? o->adjust[i] : 0;
    uint64_t addr = o->inputs[i] + adj;
    uint32_t module, j, n = s->name != NULL ? (uint32_t)s->inlined_cnt + 1 : 1;

    if (o->k + n > o->nframes)
        return;
    o->keys[o->g] = i;
    o->groups[o->g++] = n;
    if (s->name == NULL) {
        o->addrs[o->k] = addr;
        o->offsets[o->k] = 0;
        o->lines[o->k] = 0;
        o->where_ids[o->k++] = at_where(c, 0, 0, 0, 0, s->reason);
        return;
    }
    module = at_str(c, s->module, AT_MODULE);
    for (j = n - 1; j-- > 0;) {  /* blazesym lists inlined calls outermost first */
        const struct blaze_symbolize_inlined_fn *fn = &s->inlined[j];
        o->addrs[o->k] = addr;
        o->offsets[o->k] = 0;
        o->lines[o->k] = fn->code_info.line;
        o->where_ids[o->k++] = at_where(c, at_str(c, fn->name, AT_NAME),
                                        at_path(c, &fn->code_info), module, 1, 0);
    }
    o->addrs[o->k] = addr;
    o->offsets[o->k] = s->offset + adj;
    o->lines[o->k] = s->code_info.line;
    o->where_ids[o->k++] = at_where(c, at_str(c, s->name, AT_NAME),
                                    at_path(c, &s->code_info), module, 0, 0);
}

/* Fill per-frame columns and the tables they index. inputs[] are the
   addresses blazesym was given; a frame reports inputs[i] + adjust[i] (a
   return address looked up one byte early). Groups (the frames of one
   address) come in input order, or, with singles_first, every one-frame
   group first and then the others (each in input order): keys[] gives the
   input index of each group. Capacities, from nframes = apptrace_frame_count(res):
   addrs, offsets, lines and where_ids nframes; keys and groups res->cnt;
   strs/kinds 4*nframes+1; paths 2*(nframes+1); wheres 5*(nframes+1).
   sizes[] receives the number of strings, paths, wheres and one-frame
   groups. Returns 0, or -1 when out of memory. */
int apptrace_pack(const struct blaze_syms *res, const uint64_t *inputs, const uint8_t *adjust,
                  int singles_first, size_t nframes, uint64_t *addrs, uint64_t *offsets,
                  uint32_t *lines, uint32_t *where_ids, uint64_t *keys, uint32_t *groups,
                  const char **strs, uint8_t *kinds, uint32_t *paths, uint32_t *wheres,
                  size_t *sizes)
{
    struct at_ctx c;
    struct at_out o;
    size_t slots = 16, i, singles = 0;

    while (slots < 8 * (nframes + 1))
        slots <<= 1;
    memset(&c, 0, sizeof c);
    c.mask = slots - 1;
    c.str_slots = calloc(slots, sizeof(uint32_t));
    c.path_slots = calloc(slots, sizeof(uint32_t));
    c.where_slots = calloc(slots, sizeof(uint32_t));
    c.str_hash = malloc((4 * nframes + 1) * sizeof(uint64_t));
    if (!c.str_slots || !c.path_slots || !c.where_slots || !c.str_hash) {
        free(c.str_slots);
        free(c.path_slots);
        free(c.where_slots);
        free(c.str_hash);
        return -1;
    }
    c.strs = strs;
    c.kinds = kinds;
    c.paths = paths;
    c.wheres = wheres;
    memset(&o, 0, sizeof o);
    o.inputs = inputs;
    o.adjust = adjust;
    o.nframes = nframes;
    o.addrs = addrs;
    o.offsets = offsets;
    o.keys = keys;
    o.lines = lines;
    o.where_ids = where_ids;
    o.groups = groups;
    for (i = 0; i < res->cnt; i++) {
        const struct blaze_sym *s = &res->syms[i];
        int single = s->name == NULL || s->inlined_cnt == 0;

        singles += single;
        if (!singles_first || single)
            at_emit(&c, &o, s, i);
    }
    if (singles_first)
        for (i = 0; i < res->cnt; i++) {
            const struct blaze_sym *s = &res->syms[i];
            if (s->name != NULL && s->inlined_cnt != 0)
                at_emit(&c, &o, s, i);
        }
    sizes[0] = c.nstr;
    sizes[1] = c.npath;
    sizes[2] = c.nwhere;
    sizes[3] = singles;
    free(c.str_slots);
    free(c.path_slots);
    free(c.where_slots);
    free(c.str_hash);
    return 0;
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(_CDEF_TYPES + PACK_CDEF)
ffibuilder.set_source("apptrace._blazepack", PACK_C, extra_compile_args=["-O2"])


def _install(built: str, dest: str) -> None:
    shutil.copyfile(built, dest + ".tmp")
    os.replace(dest + ".tmp", dest)


def build_frames(tmp: str, dest_dir: str) -> str:
    """Compile apptrace/_frames.c (a plain CPython extension: it builds the
    frame tuples) with setuptools' build_ext."""
    from setuptools import Distribution, Extension

    ext = Extension("apptrace._frames", [os.path.join(HERE, "_frames.c")],
                    extra_compile_args=["-O2"])
    dist = Distribution({"name": "apptrace-frames", "ext_modules": [ext]})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_temp = os.path.join(tmp, "temp")  # type: ignore[attr-defined]
    cmd.build_lib = os.path.join(tmp, "lib")  # type: ignore[attr-defined]
    cmd.ensure_finalized()
    cmd.run()
    dest = os.path.join(dest_dir, os.path.basename(cmd.get_ext_fullpath(ext.name)))  # type: ignore[attr-defined]
    _install(cmd.get_ext_fullpath(ext.name), dest)  # type: ignore[attr-defined]
    return dest


def build(dest_dir: str = HERE) -> list[str]:
    """Compile in a scratch directory and install both extensions next to this file."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    with tempfile.TemporaryDirectory(prefix="apptrace-blazepack-") as tmp:
        built = ffibuilder.compile(tmpdir=tmp, verbose=False)
        dest = os.path.join(dest_dir, "_blazepack" + suffix)
        _install(built, dest)
        return [dest, build_frames(tmp, dest_dir)]


if __name__ == "__main__":
    for path in build():
        print(f"blazepack: {path} ready")

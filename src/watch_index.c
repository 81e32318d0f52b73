/*
 * watch_index.c - the watch service's wires: the list, and two hash
 * indexes over it, so a response finds its wire by watch ID and a new
 * watcher finds a wire to share by spec, in the same time whatever the
 * number of wires.
 *
 * Both indexes are arrays of chains of one size (a power of 2), doubled
 * together when they hold as many wires as chains. This file is the only
 * one that links or unlinks a wire (its prev, next, same_slot, same_spec
 * and listed fields); the wires themselves are watch.c's, which makes and
 * frees them. Every function runs under the engine mutex but the hash
 * and the final free (when nothing else can run).
 */
#include <stdlib.h>
#include <string.h>

#include "watch_internal.h"

static size_t index_slot(const watch_mux *m, int64_t id) {
  return (size_t)(((uint64_t)id * 0x9E3779B97F4A7C15ULL) >> 32) & (m->index_size - 1);
}

/* FNV-1a over the key, the range end and the options. */
uint32_t etcd3_watch_spec_hash(const watch_spec *s) {
  uint32_t h = 2166136261u;
  const int flags[] = {s->has_range_end, s->prev_kv, s->progress_notify, s->fragment,
                       s->noput, s->nodelete};
  for (size_t i = 0; i < s->key_len; i++) h = (h ^ s->key[i]) * 16777619u;
  h = (h ^ 0xffu) * 16777619u;
  for (size_t i = 0; i < s->range_end_len; i++) h = (h ^ s->range_end[i]) * 16777619u;
  for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
    h = (h ^ (uint32_t)(flags[i] != 0)) * 16777619u;
  return h;
}

static int same_spec(const watch_spec *a, const watch_spec *b) {
  return a->key_len == b->key_len && a->range_end_len == b->range_end_len &&
         !!a->has_range_end == !!b->has_range_end && !!a->prev_kv == !!b->prev_kv &&
         !!a->progress_notify == !!b->progress_notify && !!a->fragment == !!b->fragment &&
         !!a->noput == !!b->noput && !!a->nodelete == !!b->nodelete &&
         (a->key_len == 0 || !memcmp(a->key, b->key, a->key_len)) &&
         (a->range_end_len == 0 || !memcmp(a->range_end, b->range_end, a->range_end_len));
}

ETCD3_LOCKED watch_wire *etcd3_wires_find(const watch_mux *m, int64_t id) {
  watch_wire *w;
  if (!m->index_size) return NULL;
  for (w = m->index[index_slot(m, id)]; w && w->id != id; w = w->same_slot) {
  }
  return w;
}

/* Same key, range and options, neither ended nor being cancelled; then
 * with start_revision S, a wire known to have delivered nothing at or
 * above S; without, a wire without either. */
ETCD3_LOCKED watch_wire *etcd3_wires_joinable(const watch_mux *m, const watch_spec *spec,
                                              uint32_t hash) {
  if (!m->index_size) return NULL;
  for (watch_wire *w = m->by_spec[hash & (m->index_size - 1)]; w; w = w->same_spec) {
    if (w->spec_hash != hash || w->ended || w->cancel_wanted || !same_spec(&w->spec, spec))
      continue;
    if (spec->start_revision > 0 ? w->knows_revision && spec->start_revision > w->revision
                                 : w->spec.start_revision == spec->start_revision)
      return w;
  }
  return NULL;
}

/* Doubles both indexes when they hold as many wires as chains; 0 on out
 * of memory. */
ETCD3_LOCKED static int grow_index(watch_mux *m) {
  size_t size = m->index_size ? m->index_size * 2 : 64;
  watch_wire **index = (watch_wire **)calloc(size, sizeof *index);
  watch_wire **by_spec = (watch_wire **)calloc(size, sizeof *by_spec);
  if (!index || !by_spec) {
    free(index);
    free(by_spec);
    return 0;
  }
  free(m->index);
  free(m->by_spec);
  m->index = index;
  m->by_spec = by_spec;
  m->index_size = size;
  for (watch_wire *w = m->wires; w; w = w->next) {
    w->same_slot = index[index_slot(m, w->id)];
    index[index_slot(m, w->id)] = w;
    w->same_spec = by_spec[w->spec_hash & (size - 1)];
    by_spec[w->spec_hash & (size - 1)] = w;
  }
  return 1;
}

ETCD3_LOCKED int etcd3_wires_add(watch_mux *m, watch_wire *w) {
  size_t slot;
  if (m->count >= m->index_size && !grow_index(m)) return 0;
  slot = index_slot(m, w->id);
  w->same_slot = m->index[slot];
  m->index[slot] = w;
  slot = w->spec_hash & (m->index_size - 1);
  w->same_spec = m->by_spec[slot];
  m->by_spec[slot] = w;
  w->prev = NULL;
  w->next = m->wires;
  if (m->wires) m->wires->prev = w;
  m->wires = w;
  m->count++;
  w->listed = 1;
  return 1;
}

ETCD3_LOCKED void etcd3_wires_remove(watch_mux *m, watch_wire *w) {
  watch_wire **p;
  if (!w->listed) return;
  for (p = &m->index[index_slot(m, w->id)]; *p != w; p = &(*p)->same_slot) {
  }
  *p = w->same_slot;
  for (p = &m->by_spec[w->spec_hash & (m->index_size - 1)]; *p != w; p = &(*p)->same_spec) {
  }
  *p = w->same_spec;
  if (w->prev) w->prev->next = w->next;
  else m->wires = w->next;
  if (w->next) w->next->prev = w->prev;
  m->count--;
  w->listed = 0;
}

void etcd3_wires_free_index(watch_mux *m) {
  free(m->index);
  free(m->by_spec);
}

/*
 * engine.c - one completion queue and one thread per client, its channels,
 * its timers and the registry of the services that run on it.
 *
 * gRPC makes progress (connects, reconnects, keepalive pings) only while some
 * thread waits on a completion queue, so each client owns a thread that waits
 * on its queue forever and dispatches every event to the tag's `done`
 * function. That thread never touches a lua_State: results cross to Lua
 * through structures guarded by the engine mutex, a condition variable for
 * threads that block, and an eventfd for event loops (client:pollfd()).
 *
 * Lifetime: etcd3_engine_close() (client close or __gc) cancels what is in
 * flight, destroys the channels (or hands those still connecting to the
 * reaper below), shuts the queue down and joins the thread;
 * the struct itself lives until its last reference (bound objects hold one)
 * is released, so Lua may collect clients and calls in any order.
 *
 * This file names no service: lease keepalive, watches, auth and calls
 * register an etcd3_service_ops table (engine.h) and are run through it.
 */
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>

#include <grpc/grpc_security.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>

#include "engine.h"

/* gRPC is initialised lazily by the first client (never in luaopen: a
 * process that forks after grpc_init cannot use gRPC in the child). */
/* Forks seen by this process: a child bumps it (pthread_atfork), so the
 * check on every method costs no getpid() syscall. */
static volatile unsigned fork_generation;
static void on_fork_child(void) { fork_generation++; }

static pthread_once_t grpc_once = PTHREAD_ONCE_INIT;

/* gRPC logs connection errors to stderr from its own threads; a library
 * must not write there (in nginx it lands in the error log for every
 * reconnect). What matters reaches the caller as the status message.
 * GRPC_VERBOSITY set by the user keeps gRPC's own logging. */
static void quiet_log(gpr_log_func_args *args) { (void)args; }

/* Debian's abseil is built without NDEBUG, so each of the absl::Mutex
 * lock/unlock pairs gRPC takes (about 20 per call) also runs absl's
 * deadlock detector, a debugging aid: about 5 k instructions per call
 * (bench/README.md). absl turns it off process-wide with
 * absl::SetMutexDeadlockDetectionMode(OnDeadlockCycle::kIgnore), a C++
 * function: looked up by its mangled name among this module's libraries
 * (abseil's inline namespace is part of the name: Debian's, then upstream's
 * LTS ones of gRPC 1.4x-1.5x's time); when none is found nothing changes.
 * ETCD3_ABSL_DEADLOCK_DETECTION=1 leaves the detector as it is. */
static void absl_deadlock_detection_off(void *lib) {
  static const char *const names[] = {
    "_ZN4absl7debian329SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE",
    "_ZN4absl12lts_2022062329SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE",
    "_ZN4absl12lts_2023012529SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE",
    "_ZN4absl12lts_2023080229SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE",
  };
  const char *keep = getenv("ETCD3_ABSL_DEADLOCK_DETECTION");
  if ((keep && *keep && strcmp(keep, "0") != 0) || !lib) return;
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    void *sym = dlsym(lib, names[i]);
    if (sym) {
      void (*set_mode)(int); /* the enum's kIgnore is 0 */
      *(void **)&set_mode = sym;
      set_mode(0);
      break;
    }
  }
}

/* Keeps this module mapped for the life of the process and returns a
 * handle to it (NULL when not found). lua_close unloads C modules, but the
 * reaper thread below runs this module's code until its last channel is
 * gone, up to 21 s later: unmapped under it, it crashed the process. */
static void *pin_module(void) {
  Dl_info self;
  if (!dladdr((void *)pin_module, &self) || !self.dli_fname) return NULL;
  return dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

static void init_grpc(void) {
  pthread_atfork(NULL, NULL, on_fork_child);
  absl_deadlock_detection_off(pin_module());
  if (!getenv("GRPC_VERBOSITY")) gpr_set_log_function(quiet_log);
  grpc_init();
}

double etcd3_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

gpr_timespec etcd3_deadline(double seconds) {
  if (seconds < 0) seconds = 0;
  if (seconds > 1e8) return gpr_inf_future(GPR_CLOCK_MONOTONIC);
  return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                      gpr_time_from_micros((int64_t)(seconds * 1e6), GPR_TIMESPAN));
}

int etcd3_engine_forked(const etcd3_engine *e) { return e->fork_generation != fork_generation; }

/* The longest the engine thread sleeps without looking at its timers. */
#define MAX_IDLE 1.0

/* Runs every service's timer; returns the seconds until one wants to run
 * again (at most MAX_IDLE). */
static double run_timers(etcd3_engine *e) {
  double now = etcd3_now(), next = 0;
  pthread_mutex_lock(&e->mu);
  for (size_t i = 0; i < e->n_services; i++) {
    etcd3_service sv = e->services[i]; /* a copy: a tick may register a service */
    double t = sv.ops->tick ? sv.ops->tick(e, sv.state, now) : 0;
    if (t > 0 && (next == 0 || t < next)) next = t;
  }
  pthread_mutex_unlock(&e->mu);
  if (next == 0 || next - now > MAX_IDLE) return MAX_IDLE;
  return next > now ? next - now : 0;
}

/* Whether the engine thread may rest instead of polling: nothing of its
 * own is under way (no stream, no call it completes) and every
 * channel is connected or idle. Then the threads that wait for their own
 * blocking calls are gRPC's only pollers and do the I/O themselves: with
 * epoll1 a resting-free engine thread would be the designated poller and
 * hand every completion over with a wake-up (measured: +100 us CPU per
 * call). Returns 1 to rest, 0 to poll, -1 to poll only because a channel
 * is not connected yet (a short poll then: see CONNECT_SLICE). */
ETCD3_LOCKED static int may_rest(etcd3_engine *e) {
  if (e->closed || e->polled) return 0;
  for (size_t i = 0; i < e->n_channels; i++) {
    grpc_connectivity_state st = grpc_channel_check_connectivity_state(e->channels[i].channel, 0);
    if (st != GRPC_CHANNEL_READY && st != GRPC_CHANNEL_IDLE) return -1;
  }
  return 1;
}

/* Wakes a resting engine thread (something for it to poll now). */
ETCD3_LOCKED void etcd3_engine_wake(etcd3_engine *e) {
  if (e->resting) pthread_cond_broadcast(&e->cond);
}

/* How often a resting engine thread looks at its channels again. */
#define REST_CHECK 0.1

/* While a channel connects the engine thread polls (someone must: a
 * client may have no call under way), but in slices that start this short
 * and double up to MAX_IDLE: nothing wakes a poller when the channel turns
 * READY, and until it rests again it stays gRPC's designated poller, which
 * hands every blocking call's completion over with a wake-up. A slice of
 * MAX_IDLE kept a client's first second of calls at about 1.4x the CPU of
 * later ones (bench/README.md); a loopback connection is READY within the
 * first slices, one that hangs costs a few wake-ups before 1 s slices. */
#define CONNECT_SLICE 0.001

static void *engine_main(void *arg) {
  etcd3_engine *e = (etcd3_engine *)arg;
  double slice = 0; /* the current connecting slice; 0 when not connecting */
  for (;;) {
    double wait = run_timers(e);
    grpc_event ev;
    int rest;
    pthread_mutex_lock(&e->mu);
    rest = may_rest(e);
    if (rest > 0) {
      e->resting = 1;
      etcd3_engine_cond_wait(e, wait < REST_CHECK ? wait : REST_CHECK);
      e->resting = 0;
      pthread_mutex_unlock(&e->mu);
      slice = 0;
      continue;
    }
    pthread_mutex_unlock(&e->mu);
    if (rest < 0) {
      slice = slice > 0 ? slice * 2 : CONNECT_SLICE;
      if (slice > MAX_IDLE) slice = MAX_IDLE;
      if (wait > slice) wait = slice;
    } else {
      slice = 0;
    }
    ev = grpc_completion_queue_next(e->cq, etcd3_deadline(wait), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
    if (ev.type == GRPC_OP_COMPLETE && ev.tag)
      ((etcd3_tag *)ev.tag)->done((etcd3_tag *)ev.tag, ev.success);
  }
  return NULL;
}

ETCD3_LOCKED void etcd3_engine_ref_locked(etcd3_engine *e) { e->refs++; }
ETCD3_LOCKED void etcd3_engine_unref_locked(etcd3_engine *e) { e->refs--; }

void etcd3_engine_ref(etcd3_engine *e) {
  pthread_mutex_lock(&e->mu);
  e->refs++;
  pthread_mutex_unlock(&e->mu);
}

ETCD3_LOCKED void *etcd3_engine_service(etcd3_engine *e, const etcd3_service_ops *ops) {
  for (size_t i = 0; i < e->n_services; i++)
    if (e->services[i].ops == ops) return e->services[i].state;
  return NULL;
}

/* An array of `room` items of `size` bytes holding `used`, with room for
 * one more (moved when it had none: doubled, from 2); NULL, leaving it as
 * it was, on out of memory. */
static void *grow(void *array, size_t *room, size_t used, size_t size) {
  size_t want = *room ? *room * 2 : 2;
  void *moved;
  if (used < *room) return array;
  if (want > SIZE_MAX / size) return NULL;
  moved = realloc(array, want * size);
  if (moved) *room = want;
  return moved;
}

ETCD3_LOCKED void *etcd3_engine_service_get(etcd3_engine *e, const etcd3_service_ops *ops,
                                            size_t size) {
  void *state = etcd3_engine_service(e, ops);
  etcd3_service *services;
  if (state || e->closed) return state;
  services = (etcd3_service *)grow(e->services, &e->services_room, e->n_services, sizeof *services);
  if (!services) return NULL;
  e->services = services;
  state = calloc(1, size);
  if (!state) return NULL;
  e->services[e->n_services].ops = ops;
  e->services[e->n_services].state = state;
  e->n_services++;
  return state;
}

ETCD3_LOCKED size_t etcd3_engine_metadata(etcd3_engine *e, grpc_metadata *md, size_t room) {
  size_t n = 0;
  for (size_t i = 0; i < e->n_services; i++) {
    etcd3_service sv = e->services[i];
    if (sv.ops->metadata) n += sv.ops->metadata(e, sv.state, md + n, room - n);
  }
  return n;
}

ETCD3_LOCKED void etcd3_engine_token_changed(etcd3_engine *e) {
  for (size_t i = 0; i < e->n_services; i++) {
    etcd3_service sv = e->services[i];
    if (sv.ops->token_changed) sv.ops->token_changed(e, sv.state);
  }
}

/* The queue blocking calls pluck, made on first use. */
ETCD3_LOCKED grpc_completion_queue *etcd3_engine_pluck_queue(etcd3_engine *e) {
  if (!e->pluck_cq) e->pluck_cq = grpc_completion_queue_create_for_pluck(NULL);
  return e->pluck_cq;
}

static grpc_channel *open_channel(const char *target, const etcd3_channel_options *o);

/* Adds an endpoint (auto_sync); returns its index, or -1 when closed or
 * out of memory. Only the Lua thread adds, so it may read the channels
 * unlocked; the array moves under the mutex, where every other thread
 * reads it. The PEM texts of a TLS client are not kept, so a TLS client
 * cannot add endpoints (never a plaintext channel in its place). */
int etcd3_engine_add_channel(etcd3_engine *e, const char *target) {
  int index = -1;
  etcd3_channel *channels;
  pthread_mutex_lock(&e->mu);
  if (!e->closed && !e->channel_options.tls && e->n_channels < INT_MAX &&
      (channels = (etcd3_channel *)grow(e->channels, &e->channels_room, e->n_channels,
                                        sizeof *channels)) != NULL) {
    char *copy = strdup(target);
    e->channels = channels;
    if (copy) {
      e->channels[e->n_channels].target = copy;
      e->channels[e->n_channels].retired = 0; /* (grow does not zero) */
      e->channels[e->n_channels].channel = open_channel(target, &e->channel_options);
      index = (int)e->n_channels++;
    }
  }
  pthread_mutex_unlock(&e->mu);
  return index;
}

ETCD3_LOCKED void etcd3_engine_cond_wait(etcd3_engine *e, double seconds) {
  struct timespec until;
  long long ns;
  clock_gettime(CLOCK_REALTIME, &until);
  if (seconds < 0) seconds = 0;
  ns = until.tv_nsec + (long long)(seconds * 1e9);
  until.tv_sec += (time_t)(ns / 1000000000LL);
  until.tv_nsec = (long)(ns % 1000000000LL);
  pthread_cond_timedwait(&e->cond, &e->mu, &until);
}

/* Posts news for Lua: counted once until Lua has seen it, so the pollfd
 * stays readable meanwhile (an eventfd write only on the first). Services
 * hear of every new post (one per object until Lua has seen it). */
ETCD3_LOCKED void etcd3_news_post(etcd3_engine *e, int *posted) {
  uint64_t one = 1;
  if (*posted) return;
  *posted = 1;
  if (e->news++ == 0) {
    ssize_t n = write(e->eventfd, &one, sizeof one);
    (void)n; /* the counter cannot overflow: it is drained at zero */
  }
  pthread_cond_broadcast(&e->cond);
  for (size_t i = 0; i < e->n_services; i++) {
    etcd3_service sv = e->services[i];
    if (sv.ops->on_news) sv.ops->on_news(e, sv.state, posted);
  }
}

/* Lua has seen the news (or dropped the object): the pollfd is drained
 * when no news is left. */
ETCD3_LOCKED void etcd3_news_seen(etcd3_engine *e, int *posted) {
  if (!*posted) return;
  *posted = 0;
  if (e->news > 0 && --e->news == 0) {
    uint64_t v;
    ssize_t n = read(e->eventfd, &v, sizeof v);
    (void)n; /* EAGAIN is fine: nothing to drain */
  }
}

/* Waits on the engine's condition until ready(arg) or `seconds` passed;
 * ready runs with e->mu held and may return a sooner deadline in *until.
 * Takes and releases e->mu. */
void etcd3_engine_wait_until(etcd3_engine *e, double seconds,
                             int (*ready)(void *arg, double now, double *until), void *arg) {
  double until = etcd3_now() + seconds;
  pthread_mutex_lock(&e->mu);
  for (;;) {
    double now = etcd3_now(), stop = until;
    if (ready(arg, now, &stop) || now >= stop) break;
    etcd3_engine_cond_wait(e, stop - now);
  }
  pthread_mutex_unlock(&e->mu);
}

static grpc_channel *open_channel(const char *target,
                                  const etcd3_channel_options *o) {
  grpc_arg args[11];
  grpc_channel_args cargs;
  grpc_channel_credentials *creds;
  grpc_channel *ch;
  int n = 0;
#define INT_ARG(k, v)                                            \
  do {                                                           \
    args[n].type = GRPC_ARG_INTEGER;                             \
    args[n].key = (char *)(k);                                   \
    args[n].value.integer = (v);                                 \
    n++;                                                         \
  } while (0)
  INT_ARG(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, o->max_recv_bytes);
  INT_ARG(GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, -1);
  /* Dead and frozen members are noticed only with pings, also when idle. */
  INT_ARG(GRPC_ARG_KEEPALIVE_TIME_MS, o->keepalive_ms);
  INT_ARG(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  /* Pings only while calls or streams are open: etcd's server policy
   * (permit-without-stream false) answers idle pings with a GOAWAY
   * "too_many_pings", which would break the next call. */
  INT_ARG(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 0);
  INT_ARG(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  /* A restarted member must be found again within about a second. */
  INT_ARG(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  INT_ARG(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  /* Each client owns its connections: closing one never disturbs another. */
  INT_ARG(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  /* The library decides what is retried (reads, on another endpoint);
   * gRPC's own retry layer would only buffer every message. */
  INT_ARG(GRPC_ARG_ENABLE_RETRIES, 0);
#undef INT_ARG
  if (o->tls && o->server_name) {
    args[n].type = GRPC_ARG_STRING;
    args[n].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
    args[n].value.string = (char *)o->server_name;
    n++;
  }
  cargs.num_args = (size_t)n;
  cargs.args = args;
  if (o->tls) {
    grpc_ssl_pem_key_cert_pair pair;
    pair.private_key = o->key;
    pair.cert_chain = o->cert;
    /* never a silent plaintext fallback: TLS or no connection */
    creds = grpc_ssl_credentials_create(o->ca, o->cert && o->key ? &pair : NULL, NULL, NULL);
  } else {
    creds = grpc_insecure_credentials_create();
  }
  ch = grpc_channel_create(target, creds, &cargs);
  grpc_channel_credentials_release(creds);
  return ch;
}

etcd3_engine *etcd3_engine_new(const char *const *targets, size_t n,
                               const etcd3_channel_options *opts, char *err,
                               size_t errlen) {
  etcd3_engine *e = (etcd3_engine *)calloc(1, sizeof *e);
  err[0] = '\0';
  if (!e) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  pthread_once(&grpc_once, init_grpc);
  pthread_mutex_init(&e->mu, NULL);
  pthread_cond_init(&e->cond, NULL);
  e->refs = 1;
  e->fork_generation = fork_generation;
  e->eventfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  /* endpoints added later (auto_sync) grow it */
  e->channels = (etcd3_channel *)calloc(n ? n : 1, sizeof *e->channels);
  e->channels_room = n ? n : 1;
  e->channel_options = *opts;
  /* the PEM texts are the caller's: not kept (added channels need none) */
  e->channel_options.ca = e->channel_options.cert = NULL;
  e->channel_options.key = e->channel_options.server_name = NULL;
  if (e->eventfd < 0 || !e->channels) {
    snprintf(err, errlen, "cannot create client: %s", strerror(errno));
    goto fail;
  }
  e->cq = grpc_completion_queue_create_for_next(NULL);
  for (size_t i = 0; i < n; i++) {
    e->channels[i].target = strdup(targets[i]);
    if (!e->channels[i].target) goto fail_channels;
    e->channels[i].channel = open_channel(targets[i], opts);
    e->n_channels++;
  }
  if (pthread_create(&e->thread, NULL, engine_main, e) != 0) {
    snprintf(err, errlen, "cannot start the engine thread: %s", strerror(errno));
    goto fail_channels;
  }
  e->thread_started = 1;
  return e;
fail_channels:
  if (!*err) snprintf(err, errlen, "out of memory");
  etcd3_engine_close(e);
  etcd3_engine_release(e);
  return NULL;
fail:
  if (e->eventfd >= 0) close(e->eventfd);
  free(e->channels);
  pthread_cond_destroy(&e->cond);
  pthread_mutex_destroy(&e->mu);
  free(e);
  return NULL;
}

/* Channels closed while a connection attempt may be in flight.
 *
 * gRPC 1.51 leaks the connection of a subchannel shut down while its
 * attempt is in flight when that attempt then succeeds: the finished
 * attempt finds the subchannel shut down and returns without destroying
 * the transport it got (Subchannel::OnConnectingFinishedLocked; later
 * releases reset the result there). The socket stays ESTABLISHED for good:
 * a client closed while a member was starting up left one behind.
 * So a channel that is CONNECTING at close is destroyed when its state
 * next changes (the attempt ended); one in TRANSIENT_FAILURE, where pick
 * first retries behind a sticky state, when its state changes (to
 * CONNECTING: then at the end of that attempt) or REAP_AFTER seconds after
 * close (gRPC's connect deadline is 20 s: an attempt under way at close
 * has ended by then; one begun since may not have, which is the leak's
 * remaining window). One process-wide thread waits for them; it ends
 * when none is left. */
#define REAP_AFTER 21.0

typedef struct {
  grpc_channel *channel;
  grpc_connectivity_state state; /* last seen */
  gpr_timespec until;
} dying_channel;

static struct {
  pthread_mutex_t mu;
  grpc_completion_queue *cq; /* made once, kept for the process */
  size_t count;              /* dying channels not destroyed yet */
  int running;               /* a reaper thread is up */
} reaper = { .mu = PTHREAD_MUTEX_INITIALIZER };

static int settling(grpc_connectivity_state s) {
  return s == GRPC_CHANNEL_CONNECTING || s == GRPC_CHANNEL_TRANSIENT_FAILURE;
}

static void reaper_watch(dying_channel *d) {
  grpc_channel_watch_connectivity_state(d->channel, d->state, d->until, reaper.cq, d);
}

static void *reaper_main(void *arg) {
  (void)arg;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(reaper.cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    dying_channel *d = (dying_channel *)ev.tag;
    int last;
    if (ev.type != GRPC_OP_COMPLETE || !d) continue;
    d->state = grpc_channel_check_connectivity_state(d->channel, 0);
    if (ev.success && d->state == GRPC_CHANNEL_CONNECTING) {
      /* an attempt began (out of TRANSIENT_FAILURE): wait for its end */
      d->until = etcd3_deadline(REAP_AFTER);
      reaper_watch(d);
      continue;
    }
    /* Any other change ends the attempt that was in flight: destroyed at
     * once, before pick first's backoff starts the next one (a peer that
     * never answers would otherwise get a new 20 s attempt). Or the
     * deadline passed. */
    grpc_channel_destroy(d->channel);
    free(d);
    pthread_mutex_lock(&reaper.mu);
    last = --reaper.count == 0;
    if (last) reaper.running = 0;
    pthread_mutex_unlock(&reaper.mu);
    if (last) return NULL;
  }
}

/* Destroys `channel` now, or hands it to the reaper while it settles. */
static void channel_retire(grpc_channel *channel) {
  grpc_connectivity_state s = grpc_channel_check_connectivity_state(channel, 0);
  dying_channel *d = settling(s) ? (dying_channel *)malloc(sizeof *d) : NULL;
  int ok = d != NULL;
  if (ok) {
    pthread_mutex_lock(&reaper.mu);
    if (!reaper.cq) reaper.cq = grpc_completion_queue_create_for_next(NULL);
    if (!reaper.running) {
      pthread_t t;
      pthread_attr_t attr;
      pthread_attr_init(&attr);
      pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
      reaper.running = pthread_create(&t, &attr, reaper_main, NULL) == 0;
      pthread_attr_destroy(&attr);
    }
    ok = reaper.running;
    if (ok) reaper.count++;
    pthread_mutex_unlock(&reaper.mu);
  }
  if (!ok) { /* no memory or no thread: destroyed at once, as gRPC allows */
    free(d);
    grpc_channel_destroy(channel);
    return;
  }
  d->channel = channel;
  d->state = s;
  d->until = etcd3_deadline(REAP_AFTER);
  reaper_watch(d);
}

/* Idempotent. Not for a forked child: there it must not be called at all. */
void etcd3_engine_close(etcd3_engine *e) {
  pthread_mutex_lock(&e->mu);
  if (e->closed) {
    pthread_mutex_unlock(&e->mu);
    return;
  }
  e->closed = 1;
  etcd3_engine_wake(e); /* it must be polling to see the shutdown */
  for (size_t i = 0; i < e->n_services; i++) {
    etcd3_service sv = e->services[i];
    if (sv.ops->shutdown) sv.ops->shutdown(e, sv.state);
  }
  pthread_mutex_unlock(&e->mu);
  for (size_t i = 0; i < e->n_channels; i++) {
    if (e->channels[i].channel) channel_retire(e->channels[i].channel);
    e->channels[i].channel = NULL;
  }
  if (e->cq) {
    grpc_completion_queue_shutdown(e->cq);
    /* The thread drains every pending tag, then sees the shutdown. */
    if (e->thread_started) pthread_join(e->thread, NULL);
    e->thread_started = 0;
    grpc_completion_queue_destroy(e->cq);
    e->cq = NULL;
  }
}

void etcd3_engine_release(etcd3_engine *e) {
  int last;
  pthread_mutex_lock(&e->mu);
  last = --e->refs == 0;
  pthread_mutex_unlock(&e->mu);
  if (!last) return;
  if (e->pluck_cq) {
    /* every plucked call held a reference: none is pending any more */
    grpc_completion_queue_shutdown(e->pluck_cq);
    grpc_completion_queue_destroy(e->pluck_cq);
  }
  for (size_t i = 0; i < e->n_channels; i++) free(e->channels[i].target);
  free(e->channels);
  for (size_t i = 0; i < e->n_services; i++) {
    const etcd3_service *sv = &e->services[i];
    if (sv->ops->free) sv->ops->free(sv->state);
  }
  free(e->services);
  close(e->eventfd);
  pthread_cond_destroy(&e->cond);
  pthread_mutex_destroy(&e->mu);
  free(e);
}

/*
 * policy.c - which endpoint, when to retry, how long to back off (the
 * rules are stated in policy.h). Re-authentication, the fourth part of the
 * policy, is auth.c's: it owns the credentials and the shared Authenticate.
 */
#include <string.h>

#include "policy.h"

#define MIN_BACKOFF 0.1
#define MAX_BACKOFF 1.0

void etcd3_backoff_reset(etcd3_backoff *b) { b->delay = MIN_BACKOFF; }

double etcd3_backoff_next(etcd3_backoff *b) {
  double wait = b->delay < MIN_BACKOFF ? MIN_BACKOFF : b->delay;
  b->delay = wait * 2 > MAX_BACKOFF ? MAX_BACKOFF : wait * 2;
  return wait;
}

double etcd3_backoff_round(int round) {
  etcd3_backoff b;
  double wait = 0;
  etcd3_backoff_reset(&b);
  for (int i = 0; i < round && wait < MAX_BACKOFF; i++) wait = etcd3_backoff_next(&b);
  return wait;
}

/* ---- endpoint --------------------------------------------------------- */

/* Whether channel i may take a request; `connect` asks an idle channel to
 * start connecting (the current one connects when its call starts). */
ETCD3_LOCKED static int usable(etcd3_engine *e, size_t i, int connect) {
  const etcd3_channel *c = &e->channels[i];
  return c->channel && !c->retired &&
         grpc_channel_check_connectivity_state(c->channel, connect) !=
             GRPC_CHANNEL_TRANSIENT_FAILURE;
}

ETCD3_LOCKED size_t etcd3_policy_pick(etcd3_engine *e) {
  size_t n = e->n_channels, current = e->current < n ? e->current : 0;
  if (n == 1 || usable(e, current, 0)) return current;
  for (size_t step = 1; step < n; step++) {
    size_t i = (current + step) % n;
    if (usable(e, i, 1)) {
      e->current = i;
      return i;
    }
  }
  return current;
}

ETCD3_LOCKED void etcd3_policy_failed(etcd3_engine *e, size_t channel) {
  if (e->current == channel) e->current = (channel + 1) % e->n_channels;
}

ETCD3_LOCKED void etcd3_policy_prefer(etcd3_engine *e, size_t channel) {
  if (channel < e->n_channels) e->current = channel;
}

ETCD3_LOCKED void etcd3_policy_retire(etcd3_engine *e, size_t channel, int retired) {
  if (channel < e->n_channels) e->channels[channel].retired = retired != 0;
}

/* ---- retry ------------------------------------------------------------ */

/* etcd's messages for a token it will not take (etcd 3.4 rpctypes):
 * ErrGRPCInvalidAuthToken (UNAUTHENTICATED), ErrGRPCUserEmpty (the token
 * expired before the request reached the auth store) and
 * ErrGRPCAuthOldRevision (the auth store changed since the token was
 * made), both INVALID_ARGUMENT. */
static const char *const TOKEN_REFUSALS[] = {
  "invalid auth token", "user name is empty", "revision of auth store is old", NULL,
};

int etcd3_policy_token_refused(grpc_status_code status, const char *details) {
  if (status == GRPC_STATUS_UNAUTHENTICATED) return 1;
  if (!details) return 0;
  for (const char *const *m = TOKEN_REFUSALS; *m; m++)
    if (strstr(details, *m)) return 1;
  return 0;
}

/* gRPC 1.51 fails a call at once, before anything is written, when its
 * channel has no connection to pick (a fail-fast call on a channel in
 * TRANSIENT_FAILURE): this is the one UNAVAILABLE known never to have
 * reached a member. Any other (a connection reset, GOAWAY, a member that
 * stopped answering) may come after the request was sent. */
int etcd3_policy_never_sent(grpc_status_code status, const char *details) {
  return status == GRPC_STATUS_UNAVAILABLE && details &&
         strncmp(details, "failed to connect to all addresses", 34) == 0;
}

int etcd3_policy_member_failed(grpc_status_code status) {
  return status == GRPC_STATUS_UNAVAILABLE || status == GRPC_STATUS_DEADLINE_EXCEEDED ||
         status == GRPC_STATUS_UNKNOWN || status == GRPC_STATUS_INTERNAL;
}

etcd3_verdict etcd3_policy_verdict(grpc_status_code status, const char *details, int idempotent,
                                   int can_reauth) {
  if (can_reauth && etcd3_policy_token_refused(status, details)) return ETCD3_REAUTH;
  if (status == GRPC_STATUS_UNAVAILABLE && (idempotent || etcd3_policy_never_sent(status, details)))
    return ETCD3_NEXT;
  return etcd3_policy_member_failed(status) ? ETCD3_MOVE_ON : ETCD3_GIVE_UP;
}

/*
 * policy.h - how every request travels, in one place: which endpoint it
 * goes to, when a failure is retried, how long to back off, and when the
 * auth token is renewed.
 *
 * Everyone asks here: the Lua layer for each unary call (through the core
 * client's pick/failed/verdict/reauth methods, src/client.c), and the
 * engine's background services for their calls and streams (registration,
 * lease keepalive, watch, server streams), which have no Lua to ask.
 *
 *   endpoint  one sticky choice per client (e->current): a request starts
 *             there unless its channel is in TRANSIENT_FAILURE or auto_sync
 *             found the member removed (retired); a failure moves it on.
 *   retry     clientv3's rules: a read is retried on the next endpoint on
 *             UNAVAILABLE; a write only when it is known never to have
 *             been sent (gRPC found no connection to send it on); nothing
 *             past the call's deadline (the caller's loop checks it). A
 *             failure that is not retried but is the member's (a timeout)
 *             still sends the next request to the next endpoint.
 *   backoff   background retries wait 0.1 s, doubling up to 1 s, and start
 *             over once something succeeds. Lua's unary calls move to the
 *             next endpoint at once, within their deadline, as clientv3's
 *             unary retries do; only once every endpoint of several failed
 *             a read do they pause by the same steps before another round.
 *   re-auth   a request refused for its token renews it through one
 *             Authenticate shared by everyone waiting (auth.c), then is
 *             tried once more; a wrong password is not retried.
 */
#ifndef ETCD3_POLICY_H
#define ETCD3_POLICY_H

#include "engine.h"

/* ---- backoff ---------------------------------------------------------- */

typedef struct etcd3_backoff {
  double delay; /* the next wait, seconds */
} etcd3_backoff;

void etcd3_backoff_reset(etcd3_backoff *b);
/* The wait before the next try (and doubles the one after it). */
double etcd3_backoff_next(etcd3_backoff *b);
/* The pause after `round` (1, 2, ...) rounds in a row, each of which every
 * endpoint failed: the backoff's steps. */
double etcd3_backoff_round(int round);

/* ---- endpoint --------------------------------------------------------- */

/* The channel a request goes to: the current one unless it is failing or
 * retired while another is not (which becomes the current one). */
ETCD3_LOCKED size_t etcd3_policy_pick(etcd3_engine *e);
/* A request on `channel` failed for the endpoint's sake: the next request
 * starts on the next endpoint (if `channel` is still the current one). */
ETCD3_LOCKED void etcd3_policy_failed(etcd3_engine *e, size_t channel);
/* Makes `channel` the current one (it answered first). */
ETCD3_LOCKED void etcd3_policy_prefer(etcd3_engine *e, size_t channel);
/* auto_sync found the member of `channel` removed (1) or back (0). */
ETCD3_LOCKED void etcd3_policy_retire(etcd3_engine *e, size_t channel, int retired);

/* ---- retry ------------------------------------------------------------ */

typedef enum etcd3_verdict {
  ETCD3_GIVE_UP = 0,  /* the error is the answer */
  ETCD3_NEXT,         /* try again on the next endpoint */
  ETCD3_REAUTH,       /* renew the token, then try once more */
  ETCD3_MOVE_ON,      /* the error is the answer, and the member failed it
                       * (a write that timed out on a partitioned member):
                       * the next request starts on the next endpoint */
} etcd3_verdict;

/* Whether etcd refused the request for its token (expired, missing, or
 * from an older auth revision): signing in again may help. */
int etcd3_policy_token_refused(grpc_status_code status, const char *details);
/* Whether a failed request is known never to have left this process. */
int etcd3_policy_never_sent(grpc_status_code status, const char *details);
/* Whether a request failed for its member's sake (it did not answer, in
 * time or at all), rather than for what it asked: a retry goes elsewhere. */
int etcd3_policy_member_failed(grpc_status_code status);
/* What to do after a failed request: `idempotent` for reads (and the
 * background services' own calls, which are safe to repeat), `can_reauth`
 * when credentials are kept. A sticky endpoint must not keep a client on a
 * member that stopped answering: a failure that is not retried still moves
 * it on when it was the member's (ETCD3_MOVE_ON). */
etcd3_verdict etcd3_policy_verdict(grpc_status_code status, const char *details, int idempotent,
                                   int can_reauth);

#endif

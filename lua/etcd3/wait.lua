--- How blocking calls wait (README.md, section "Waiting").
--
-- C never blocks for long and never yields: every wait loop lives here, so
-- a scheduler may yield inside it. An "op" is anything with :ready() (true
-- once done) and :wait(seconds) (block at most that long): a call object
-- of etcd3.core, a lease or watch state, or a Lua object built on one.
-- Optional: `polling = true` when no completion signals it (a waiter must
-- look again by itself), `:recheck()` -> seconds until it may turn ready
-- with no completion (a lease's TTL running out locally).
--
-- A strategy is function(client, op, deadline) -> ready [, err]: true once
-- the op is ready, false when the deadline passed first, or false, err
-- when this context cannot wait at all.
local core = require "etcd3.core"
local errors = require "etcd3.error"

-- luacheck: push ignore 113 (ngx: OpenResty's global, nil elsewhere)
local ngx = ngx
-- luacheck: pop
local package, tostring = package, tostring
local now, math_min = core.now, math.min

local _M = {}

-- Longest time Lua stays inside C at once, so Ctrl-C and hooks get through.
local SLICE = 0.1
_M.SLICE = SLICE

--- Blocks in short slices in the C module: plain scripts, and nginx's
-- init_worker phase (before the worker serves anything).
local function plain(_, op, deadline)
  while not op:ready() do
    local left = deadline - now()
    if left <= 0 then return false end
    -- a call's wait answers true once it is done: no need to ask again
    if op:wait(math_min(left, SLICE)) == true then return true end
  end
  return true
end
_M.plain = plain

--- Whether this runs under OpenResty (whatever the phase): known at load,
-- as `ngx` above is (asked at every request, it cost a call each time).
local IN_NGINX = ngx ~= nil and ngx.get_phase ~= nil

--- Whether this runs inside a running cqueues controller.
local function in_cqueues()
  local cqueues = package.loaded.cqueues
  return cqueues ~= nil and cqueues.running ~= nil and cqueues.running()
end

-- OpenResty ---------------------------------------------------------------
--
-- A waiting call parks its coroutine on an ngx.semaphore and the completion
-- itself wakes it, nothing polls: per client and worker one light thread
-- (an ngx.timer, which outlives requests) reads a cosocket connected to
-- the engine's notifier (src/notifier.c), which writes a byte when news is
-- posted; the thread then posts the semaphore of every waiting op that is
-- ready, asking only the ops the notifier names (calls and watchers have a
-- `news_key`) and those that cannot be named. An idle worker runs no Lua.

-- Phases where a coroutine may yield (lua-nginx-module's documentation of
-- ngx.sleep's and ngx.semaphore's contexts).
local NGX_YIELDING = {
  rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
}
-- Phases that run before the worker serves: blocking there is fine.
local NGX_BLOCKING = { init_worker = true, init = true }

-- A parked coroutine's own timer: only its deadline (capped to keep the
-- number sane for calls that wait forever).
local PARK_MAX = 3600
-- Once the worker is exiting (reload, shutdown), waits may go on this long:
-- enough for a call in flight, while a watch must not hold the old worker.
local EXIT_GRACE = 0.5
-- The reader's socket waits for news without a timer that fires while idle
-- (lua-nginx-module's largest read timeout, ms; it would log a timeout).
local READ_FOREVER = 2147483647
-- A pending timer fires at once, "premature", when the worker starts to
-- exit: that is how the reader learns of it without looking every second.
local EXIT_WATCH = 3600

local WEAK_KEYS = { __mode = "k" }
local notifiers = setmetatable({}, WEAK_KEYS) -- client handle -> state
local semaphores = setmetatable({}, WEAK_KEYS) -- coroutine -> its semaphore
local exit_seen -- now() when a wait first saw the worker exiting

--- Polls without blocking, ngx.sleep between polls with a short backoff
-- (1, 2, 4, 8, 16, then 32 ms between polls): for conditions no
-- completion signals (a polling_op) and, as a fallback, when the notifier
-- cannot run.
local function ngx_sleep_wait(_, op, deadline)
  local step = 0.001
  local sleep = ngx.sleep
  while not op:ready() do
    local left = deadline - now()
    if left <= 0 then return false end
    sleep(math_min(step, left))
    -- grows until it passes 20 ms: the last doubling is 16 -> 32 ms
    if step < 0.02 then step = step * 2 end
  end
  return true
end

--- Parks `op` with the waiter's semaphore: filed under its news key when
-- it has one, else with the ops asked at every wake-up.
local function file(st, sema, op)
  local key = op.news_key and op:news_key()
  st.waiting[sema] = op
  if key then
    local bucket = st.keyed[key]
    if not bucket then
      bucket = setmetatable({}, WEAK_KEYS)
      st.keyed[key] = bucket
    end
    bucket[sema] = op
    st.key_of[sema] = key
  else
    st.unkeyed[sema] = op
  end
end

local function unfile(st, sema)
  if st.waiting[sema] == nil then return end
  st.waiting[sema] = nil
  local key = st.key_of[sema]
  if key then
    st.key_of[sema] = nil
    local bucket = st.keyed[key]
    if bucket then
      bucket[sema] = nil
      if next(bucket) == nil then st.keyed[key] = nil end
    end
  else
    st.unkeyed[sema] = nil
  end
end

--- Posts the waiter's semaphore when its op is ready (an op that raises
-- too: its waiter meets the error itself).
local function wake_if_ready(st, sema, op)
  local ok, ready = pcall(op.ready, op)
  if ready or not ok then
    unfile(st, sema)
    sema:post(1)
  end
end

--- Wakes the ready waiters among those `keys` names and those without a
-- key; among all of them when `keys` is nil.
local function wake(st, keys)
  if keys == nil then
    for sema, op in pairs(st.waiting) do wake_if_ready(st, sema, op) end
    return
  end
  for key in pairs(keys) do
    local bucket = st.keyed[key]
    if bucket then
      for sema, op in pairs(bucket) do wake_if_ready(st, sema, op) end
    end
  end
  for sema, op in pairs(st.unkeyed) do wake_if_ready(st, sema, op) end
end

local function wake_all(st)
  for sema in pairs(st.waiting) do
    unfile(st, sema)
    sema:post(1)
  end
end

--- The light thread: connects to the notifier, then for each byte re-arms
-- it and wakes what is ready. Ends when the socket closes (client closed,
-- worker exiting) and wakes every waiter, which then sees why.
local function reader(premature, st)
  local n, ok, err, sock = st.notifier, not premature, nil, nil
  if ok then
    local path
    path, err = n:listen()
    ok = path ~= nil
    if ok then
      sock = ngx.socket.tcp() -- luacheck: ignore
      ok, err = sock:connect("unix:" .. path)
      if ok then ok, err = n:accept() end
    end
  end
  if ok then
    sock:settimeout(READ_FOREVER)
    while true do
      -- re-arm before looking: a completion meanwhile writes the next byte
      local keys = n:take()
      if keys == false then break end
      wake(st, keys)
      local _, rerr = sock:receive(1)
      if rerr and rerr ~= "timeout" then break end
    end
  elseif err and err ~= "client is closed" then
    st.failed = err
    ngx.log(ngx.WARN, "etcd3: waits fall back to polling: ", err) -- luacheck: ignore
  end
  if sock then sock:close() end
  n:close()
  st.ended = true
  wake_all(st)
end

--- Watches for the worker's exit: then closes the notifier, which ends
-- the reader and so wakes every waiter.
local function exit_watch(premature, st)
  if st.ended then return end
  if not premature and ngx.timer.at(EXIT_WATCH, exit_watch, st) then return end -- luacheck: ignore
  st.notifier:close()
end

--- The client's notifier state, its reader started when there is none
-- (or it ended); nil when waits must poll instead (closed client, or the
-- notifier failed in this worker).
local function notifier_state(client)
  local handle = client._core
  local st = notifiers[handle]
  if st and (st.failed or not st.ended) then return not st.failed and st or nil end
  if handle:closed() then return nil end
  st = {
    notifier = handle:notifier(),
    waiting = setmetatable({}, WEAK_KEYS), -- semaphore -> op, every parked op
    keyed = {}, -- news key -> { semaphore -> op }
    key_of = setmetatable({}, WEAK_KEYS), -- semaphore -> news key
    unkeyed = setmetatable({}, WEAK_KEYS), -- semaphore -> op without a key
  }
  notifiers[handle] = st
  local timer_at = ngx.timer.at -- luacheck: ignore
  local ok, err = timer_at(0, reader, st)
  if not ok then
    st.failed = err
    return nil
  end
  timer_at(EXIT_WATCH, exit_watch, st)
  return st
end

local function exiting_error()
  return errors.new("CANCELLED",
    "the nginx worker is exiting (reload or shutdown): the wait was ended", "wait")
end

--- In a worker that exits: a short grace, then an error, so that a long
-- wait (a watch) never holds the old worker.
local function exit_wait(client, op, deadline)
  exit_seen = exit_seen or now()
  local stop = math_min(deadline, exit_seen + EXIT_GRACE)
  if ngx_sleep_wait(client, op, stop) then return true end
  if stop < deadline then return false, exiting_error() end
  return false
end

--- Parks the coroutine until the completion wakes it or the deadline.
-- An op may offer `recheck()`: seconds until it may turn ready by itself,
-- with no news (a lease's TTL running out locally).
local function ngx_park(client, op, deadline)
  local worker = ngx.worker -- luacheck: ignore
  if op.polling then return ngx_sleep_wait(client, op, deadline) end
  local co = coroutine.running()
  local sema
  while not op:ready() do
    local left = deadline - now()
    if left <= 0 then return false end
    if worker.exiting() then return exit_wait(client, op, deadline) end
    local st = notifier_state(client)
    if not st then return ngx_sleep_wait(client, op, deadline) end
    if not sema then
      -- one per coroutine, reused: a late post only costs one more look
      sema = co and semaphores[co]
      if not sema then
        sema = require("ngx.semaphore").new(0)
        if co then semaphores[co] = sema end
      end
    end
    local park = math_min(left, PARK_MAX)
    if op.recheck then park = math_min(park, math.max(op:recheck(), 0.001)) end
    file(st, sema, op)
    sema:wait(park)
    unfile(st, sema)
  end
  return true
end

--- nil, or the error for a context where no call can wait (nginx's
-- request phases that cannot yield: set, header_filter, body_filter, log,
-- balancer). Checked before anything is sent.
local function ngx_phase_error()
  local phase = ngx.get_phase()
  if NGX_YIELDING[phase] or NGX_BLOCKING[phase] then return nil end
  return errors.new("FAILED_PRECONDITION",
    ("cannot wait for etcd in nginx's '%s' phase, where Lua cannot yield: "
      .. "make the call in a phase that can yield (rewrite, access, content) "
      .. "or in a timer (ngx.timer.at)"):format(tostring(phase)), "wait")
end

--- The automatic strategy's check before a call is sent: nil, or the
-- error for a context where the call could not be waited for.
function _M.precheck()
  if IN_NGINX then return ngx_phase_error() end
  return nil
end

local function ngx_wait(client, op, deadline)
  if NGX_YIELDING[ngx.get_phase()] then return ngx_park(client, op, deadline) end
  local err = ngx_phase_error()
  if err then return op:ready(), not op:ready() and err or nil end
  return plain(client, op, deadline)
end

-- cqueues -----------------------------------------------------------------

--- Inside a running cqueues controller: cqueues.poll on the client's pollfd.
local function cqueues_wait(client, op, deadline)
  local cqueues = package.loaded.cqueues
  local pollable = {
    pollfd = client._core:pollfd(),
    events = "r",
  }
  while not op:ready() do
    local left = deadline - now()
    if left <= 0 then return false end
    -- The fd is level-triggered and may stay readable for completions
    -- other coroutines still have to collect: then yield a moment instead.
    if client._core:wait(0) then
      cqueues.sleep(math_min(0.001, left))
    else
      cqueues.poll(pollable, math_min(left, 0.05))
    end
  end
  return true
end

--- The automatic strategy, decided at each wait (a client created in
-- init_worker is used later from content handlers and timers).
local function auto(client, op, deadline)
  if IN_NGINX then return ngx_wait(client, op, deadline) end
  if in_cqueues() then return cqueues_wait(client, op, deadline) end
  return plain(client, op, deadline)
end

--- Whether the automatic strategy will block this thread (a plain script):
-- then a call waits on a completion queue of its own, which the calling
-- thread drives itself (no hand-off to the engine thread).
function _M.blocking()
  return not (IN_NGINX or in_cqueues())
end

--- The strategy for a client config's `wait` field (nil: automatic).
function _M.strategy(user_wait)
  if not user_wait then return auto end
  return function(client, op, deadline)
    while not op:ready() do
      local left = deadline - now()
      if left <= 0 then return false end
      user_wait(client, left, op)
    end
    return true
  end
end

-- The error of a wait that ran into its deadline.
local function deadline_error(rpc, message)
  return errors.new("DEADLINE_EXCEEDED", message or "deadline exceeded", rpc)
end

--- Waits for `op` by the client's strategy until `deadline`: true once it
-- is ready, or nil, err: the strategy's own error, or DEADLINE_EXCEEDED for
-- `rpc` with `message` (default "deadline exceeded").
---@return true|nil ready
---@return etcd3.Error? err
function _M.until_ready(client, op, deadline, rpc, message)
  local ready, err = client._wait(client, op, deadline)
  if ready then return true end
  return nil, err or deadline_error(rpc, message)
end

--- Waits for a started unary call (etcd3.core's call object) and returns
-- its response; or nil, err, ended: `ended` true when etcd (or gRPC)
-- answered with an error or the deadline passed first, nil when the wait
-- itself failed (the strategy's error: a worker exiting). A call not
-- complete by its deadline is cancelled here rather than waited for (gRPC
-- enforces the same deadline, a little later on a loaded machine): that
-- timeout is the member's as much as gRPC's own, and the request policy
-- must hear of it (it moves the next request to another member).
---@return table? response
---@return etcd3.Error? err
---@return true? ended
function _M.for_response(client, call, deadline, rpc)
  -- (until_ready inlined: one call less per request)
  local ready, err = client._wait(client, call, deadline)
  if not ready then
    call:cancel()
    if err then return nil, err end
    return nil, deadline_error(rpc), true
  end
  local res, code, _, message = call:result()
  if res then return res end
  return nil, errors.new(code, message, rpc), true
end

--- Waits `seconds` by the client's strategy (a coroutine under OpenResty
-- or cqueues yields; a plain script sleeps).
function _M.pause(client, seconds)
  local stop = now() + seconds
  client._wait(client, _M.polling_op(function() return now() >= stop end), stop)
end

-- How long a polling op sleeps between two probes, at most.
local POLL_STEP = 0.01

--- An op that is ready when `probe()` returns true and waits by sleeping
-- in steps of 10 ms at most (for conditions no completion signals, such
-- as a channel becoming connected).
function _M.polling_op(probe)
  return {
    polling = true, -- (no completion wakes a waiter: it must look again)
    ready = function() return probe() end,
    wait = function(_, seconds) core.sleep(math_min(seconds, POLL_STEP)) end,
  }
end

return _M

--- How blocking calls wait (README.md, section "Waiting").
--
-- C never blocks for long and never yields: every wait loop lives here, so
-- a scheduler may yield inside it. An "op" is anything with :ready() (true
-- once done) and :wait(seconds) (block at most that long): a call object
-- of etcd3.core, a lease or watch state, or a Lua object built on one.
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
    op:wait(math_min(left, SLICE))
  end
  return true
end
_M.plain = plain

--- Whether this runs under OpenResty (whatever the phase).
local function in_nginx()
  return ngx ~= nil and ngx.get_phase ~= nil
end

--- Whether this runs inside a running cqueues controller.
local function in_cqueues()
  local cqueues = package.loaded.cqueues
  return cqueues ~= nil and cqueues.running ~= nil and cqueues.running()
end

-- OpenResty ---------------------------------------------------------------

-- Phases where ngx.sleep may yield (lua-nginx-module's documentation of
-- ngx.sleep's contexts).
local NGX_YIELDING = {
  rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
}
-- Phases that run before the worker serves: blocking there is fine.
local NGX_BLOCKING = { init_worker = true, init = true }

--- Polls without blocking, ngx.sleep between polls with a short backoff
-- (1, 2, 4, 8, 16, then 32 ms between polls): the worker keeps serving
-- other requests.
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
  if in_nginx() then return ngx_phase_error() end
  return nil
end

local function ngx_wait(client, op, deadline)
  if NGX_YIELDING[ngx.get_phase()] then return ngx_sleep_wait(client, op, deadline) end
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
  if in_nginx() then return ngx_wait(client, op, deadline) end
  if in_cqueues() then return cqueues_wait(client, op, deadline) end
  return plain(client, op, deadline)
end

--- Whether the automatic strategy will block this thread (a plain script):
-- then a call waits on a completion queue of its own, which the calling
-- thread drives itself (no hand-off to the engine thread).
function _M.blocking()
  return not (in_nginx() or in_cqueues())
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

--- Waits for `op` by the client's strategy until `deadline`: true once it
-- is ready, or nil, err: the strategy's own error, or DEADLINE_EXCEEDED for
-- `rpc` with `message` (default "deadline exceeded").
---@return true|nil ready
---@return etcd3.Error? err
function _M.until_ready(client, op, deadline, rpc, message)
  local ready, err = client._wait(client, op, deadline)
  if ready then return true end
  return nil, err or errors.new("DEADLINE_EXCEEDED", message or "deadline exceeded", rpc)
end

--- Waits for a started unary call (etcd3.core's call object) and returns
-- its response; or nil, err, completed: `completed` true when etcd (or
-- gRPC) answered with an error, nil when the wait failed, in which case
-- the call is cancelled: gRPC enforces the same deadline, and a call not
-- complete by then is cancelled here rather than waited for.
---@return table? response
---@return etcd3.Error? err
---@return true? completed
function _M.for_response(client, call, deadline, rpc)
  local ready, err = _M.until_ready(client, call, deadline, rpc)
  if not ready then
    call:cancel()
    return nil, err
  end
  local res, code, _, message = call:result()
  if res then return res end
  return nil, errors.new(code, message, rpc), true
end

-- How long a polling op sleeps between two probes, at most.
local POLL_STEP = 0.01

--- An op that is ready when `probe()` returns true and waits by sleeping
-- in steps of 10 ms at most (for conditions no completion signals, such
-- as a channel becoming connected).
function _M.polling_op(probe)
  return {
    ready = function() return probe() end,
    wait = function(_, seconds) core.sleep(math_min(seconds, POLL_STEP)) end,
  }
end

return _M

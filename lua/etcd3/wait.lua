--- How blocking calls wait (API.md, "Waiting").
--
-- C never blocks for long and never yields: every wait loop lives here, so
-- a user's scheduler may yield inside its wait function. An "op" is anything
-- with :ready() (true once done) and :wait(seconds) (block at most that
-- long): a call object of etcd3.core, or a Lua object built on one.
local core = require "etcd3.core"

local now, math_min = core.now, math.min

local _M = {}

-- Longest time Lua stays inside C at once, so Ctrl-C and hooks get through.
_M.SLICE = 0.1

--- Blocks in short slices in the C module: for plain scripts.
local function plain(_, op, deadline)
  while not op:ready() do
    local left = deadline - now()
    if left <= 0 then return false end
    op:wait(math_min(left, _M.SLICE))
  end
  return true
end

--- Returns the waiting function for a client config's `wait` field:
-- function(client, op, deadline) -> true when the op is ready, false when
-- the deadline passed first.
function _M.strategy(user_wait)
  if not user_wait then return plain end
  return function(client, op, deadline)
    while not op:ready() do
      local left = deadline - now()
      if left <= 0 then return false end
      user_wait(client, left, op)
    end
    return true
  end
end

--- An op that is ready when `probe()` returns true and waits by sleeping
-- in small steps (for conditions no completion signals, such as a channel
-- becoming connected).
function _M.polling_op(probe, step)
  step = step or 0.01
  return {
    ready = function() return probe() end,
    wait = function(_, seconds) core.sleep(math_min(seconds, step)) end,
  }
end

return _M

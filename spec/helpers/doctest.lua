--- What the hidden set-ups of README.md's examples call (spec/16-readme_spec.lua
-- runs each example in its own process; these run in that process).
local helper = require "spec.helpers.etcd"

local _M = {}

--- Bounds the watch loops of an example meant to run forever: once each
-- watch `cli` creates is confirmed, `puts` ({ key, value } pairs) are
-- written, and the watcher ends (cancelled, so `w.err` stays nil) after
-- `n` events, or when none comes for 10 s. Returns a table whose `events`
-- counts the events delivered, for the check to assert on.
function _M.bounded_watches(cli, n, puts)
  local seen = { events = 0 }
  local watch = cli.watch
  function cli.watch(self, ...)
    local w, err = watch(self, ...)
    if not w then return nil, err end
    for _, kv in ipairs(puts or {}) do assert(self:put(kv[1], kv[2])) end
    local next_event = w.next
    function w.next(me, timeout)
      if seen.events >= n then me:cancel() end
      local ev, nerr = next_event(me, timeout or 10)
      if ev then seen.events = seen.events + 1 end
      return ev, nerr
    end
    return w
  end
  return seen
end

--- The etcd processes started here, by PID and data dir, for the spec to
-- stop after the example ($DOCTEST_TMP/members).
local function started(member)
  local f = assert(io.open(assert(os.getenv("DOCTEST_TMP"), "DOCTEST_TMP unset") .. "/members", "a"))
  f:write(member.pid, " ", member.dir, "\n")
  f:close()
end

--- What the README shows as steps before member_promote: member_add of a
-- learner, and its etcd started with the cluster etcd's answer describes.
-- Returns member_add's answer.
function _M.learner(cli)
  local peer = helper.peer_url()
  local added = assert(cli:member_add({ peer }, { learner = true }))
  local initial = {}
  for _, m in ipairs(added.members) do
    initial[#initial + 1] = (m.name ~= "" and m.name or "new") .. "=" .. m.peer_urls[1]
  end
  -- a joining member takes the cluster's identity from its peers: the
  -- token is not used
  local m = helper.joining({ members = { { token = "doctest" } } }, "new", table.concat(initial, ","), peer)
  m:start()
  started(m)
  return added
end

return _M

--- Clusters whose members' peer links run through fault proxies
-- (spec/helpers/proxy.lua), so one member can be cut off from both others
-- while its client port still answers: a network partition.
local helper = require "spec.helpers.etcd"
local proxy = require "spec.helpers.proxy"

local _M = {}

--- Starts `n` members (default 3) whose peer ports each sit behind a
-- proxy (member.peer_proxy); member.id is its ID in hex. Besides what
-- helper.cluster() returns: isolate(i), heal(), and stop() ends the
-- proxies too.
function _M.cluster(n, opts)
  local proxies = {}
  local ok, c = pcall(helper.cluster, n or 3, {
    extra = opts and opts.extra,
    peer_proxy = function(m)
      local p = proxy.start(m.peer_url:match("^%a+://(.*)$"), { peer = true })
      proxies[#proxies + 1], m.peer_proxy = p, p
      return "http://" .. p.endpoint
    end,
  })
  if not ok then
    for _, p in ipairs(proxies) do p:stop() end
    error(c, 0)
  end
  local stop_members = c.stop
  function c.stop()
    stop_members()
    for _, p in ipairs(proxies) do p:stop() end
  end
  local list = c.members[1]:etcdctl("member list")
  for _, m in ipairs(c.members) do
    m.id = list:match("(%x+), started, " .. m.name .. ",")
    if not m.id then
      c.stop()
      error("no ID for " .. m.name .. " in: " .. list)
    end
  end

  --- Cuts member i off from every other member, both ways: nothing it
  -- sends reaches them, nothing they send reaches it; its client port
  -- still answers.
  function c.isolate(i)
    local m = c.members[i]
    m.peer_proxy:blackhole()
    for j, other in ipairs(c.members) do
      if j ~= i then other.peer_proxy:blackhole(m.id) end
    end
  end

  --- Every peer link forwards again.
  function c.heal()
    for _, p in ipairs(proxies) do p:heal() end
  end

  return c
end

return _M

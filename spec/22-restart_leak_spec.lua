-- Found by the soak (tools/soak.lua, `make soak`): a client created with
-- several endpoints and closed while one member is starting up (its TCP
-- port accepts, its HTTP/2 SETTINGS not sent yet) left that connection
-- behind, ESTABLISHED for good: about one fd per member restart under the
-- soak's load. gRPC 1.51 drops the transport of an attempt that succeeds
-- after its subchannel was shut down without closing it; the engine now
-- destroys a channel still connecting only once it has settled (the
-- reaper in src/engine.c).
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"

local function sockets()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("*l"):match("^%d+")
  f:close()
  return tonumber(helper.capture("ls -l /proc/" .. pid .. "/fd | grep -c socket"))
end

describe("clients closed while a member starts", function()
  local cluster
  setup(function() cluster = helper.cluster(3) end)
  teardown(function() if cluster then cluster.stop() end end)

  it("leave no connection behind", function()
    local m = cluster.members[1]
    local before = sockets()
    m:kill()
    m:start()
    local t0 = helper.now()
    while helper.now() - t0 < 5 do
      local cli = etcd3.new { endpoints = { m.endpoint, cluster.endpoints[2] }, dial_timeout = 1, timeout = 1 }
      if cli then cli:close() end
    end
    m:wait_healthy(30)
    -- the reaper holds a channel at most 21 s after its close
    local ok = pcall(helper.wait_for, function()
      collectgarbage()
      return sockets() <= before
    end, 30)
    assert(ok, ("sockets %d -> %d"):format(before, sockets()))
  end)
end)

-- Found by the soak (tools/soak.lua, `make soak`): a client created with
-- several endpoints and closed while one member is starting up (its TCP
-- port accepts, its HTTP/2 handshake is not answered yet) leaves that
-- connection behind: it completes after close and stays ESTABLISHED for
-- good (and, once the member goes away again, a dead socket), about one fd
-- per member restart under the soak's load. Same on the lead's main at
-- 9c7c17a. Pending until the engine closes such connections: the spec is
-- the reproduction, and fails today.
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

  pending("leave no connection behind", function()
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
    -- gRPC gives up a handshake still in flight 20 s after it began
    local ok = pcall(helper.wait_for, function()
      collectgarbage()
      return sockets() <= before
    end, 30)
    assert(ok, ("sockets %d -> %d"):format(before, sockets()))
  end)
end)

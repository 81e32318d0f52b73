-- A user's busted spec that runs its code against a throwaway etcd:
-- `busted examples/testing_spec.lua` (spec/30-testing_spec.lua runs it so).
local testing = require "etcd3.testing"

describe("my service", function()
  local etcd, cli

  setup(function()
    etcd = testing.start { members = 3 }   -- or { auth = { "root", "pw" } }, { tls = true }
    cli = etcd:client()                    -- endpoints, credentials, TLS files: all set
  end)

  teardown(function()
    if cli then cli:close() end
    if etcd then etcd:stop() end           -- kills what it started, removes its temp dir
  end)

  it("reads its config while the leader is down", function()
    assert(cli:put("/config/mode", "fast"))
    local leader = etcd:leader()           -- index into etcd.endpoints
    etcd:kill(leader)                      -- also freeze(i), thaw(i)
    etcd:leader()                          -- waits until the others elected one
    local other = etcd:client { endpoints = etcd.endpoints[leader % 3 + 1] }
    assert.are.equal("fast", assert(other:get("/config/mode")).kvs[1].value)
    other:close()
    etcd:restart(leader)                   -- same ports and data, healthy again
  end)
end)

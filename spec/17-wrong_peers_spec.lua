-- Wrong peers: an endpoint that is not etcd, or not etcd the way we speak
-- to it. Each gives `etcd3.new` nil, err within dial_timeout (plus slack),
-- or a call nil, err within its timeout (plus slack), with a message that
-- says what happened; nothing crashes, and once the client is closed the
-- process has no more threads or file descriptors than before.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"
local peer = require "spec.helpers.peer"
local nginx = require "spec.helpers.nginx"
local certs_helper = require "spec.helpers.certs"

-- The functional bound: a wrong peer costs the caller the time it allowed,
-- and this much more at most (a loaded machine's scheduling included).
local SLACK = 0.5
local DIAL, TIMEOUT = 1, 1

local function pid()
  local f = assert(io.open("/proc/self/stat"))
  local p = f:read("*l"):match("^%d+")
  f:close()
  return p
end

local function threads()
  local f = assert(io.open("/proc/self/status"))
  local n = tonumber(f:read("*a"):match("Threads:%s*(%d+)"))
  f:close()
  return n
end

local function fds()
  return tonumber(helper.capture("ls /proc/" .. pid() .. "/fd | wc -l"))
end

local function resources()
  collectgarbage()
  collectgarbage()
  return { threads = threads(), fds = fds() }
end

-- Threads and fds go asynchronously after close, and they get a deadline
-- for it: gRPC abandons a connection whose HTTP/2 handshake is still in
-- flight (a peer that accepted and never spoke) only at its connect
-- deadline, 20 s after the attempt began; until then that socket and its
-- poller stay open although the channel was destroyed.
local RELEASE_DEADLINE = 30

local function assert_released(before)
  local now
  local ok = pcall(helper.wait_for, function()
    now = resources()
    return now.threads <= before.threads and now.fds <= before.fds
  end, RELEASE_DEADLINE)
  assert(ok, ("threads %d -> %d, fds %d -> %d after close; fds now: %s"):format(before.threads, now.threads,
    before.fds, now.fds, helper.capture("ls -l /proc/" .. pid() .. "/fd | awk '{print $9 $10 $11}'")))
end

local function report(name, what, err, took)
  io.stderr:write(("\n[wrong peer] %-22s %-12s %.2fs  %s"):format(name, what, took, tostring(err)))
end

local function timed(f)
  local t0 = helper.now()
  local a, b = f()
  return a, b, helper.now() - t0
end

-- Every call a client makes first, on a client that connects lazily:
-- each must end in nil, err within its own timeout (plus slack).
local CALLS = {
  { "get", function(cli) return cli:get("/wrong/k") end },
  { "put", function(cli) return cli:put("/wrong/k", "v") end },
  { "txn", function(cli)
    return cli:txn():when(etcd3.compare.value("/wrong/k"):eq("v")):success(etcd3.op.get("/wrong/k")):commit()
  end },
  { "grant", function(cli) return cli:grant(10) end },
  { "member_list", function(cli) return cli:member_list() end },
  { "watch:next", watch = true, function(cli)
    local w, err = cli:watch("/wrong/k")
    if not w then return nil, err end
    local ev, werr = w:next(TIMEOUT)
    w:cancel()
    return ev, werr
  end },
}

--- The checks every wrong peer gets. `expect.why`: a pattern the reason
-- given by etcd3.new and by a watch that was never confirmed matches;
-- `expect.call`: a pattern every unary call's error matches;
-- `expect.connects`: etcd3.new succeeds (the peer speaks HTTP/2);
-- `expect.config`: more client options (tls).
local function exercise(name, endpoint, expect)
  local config = { endpoints = endpoint, dial_timeout = DIAL }
  for k, v in pairs(expect.config or {}) do config[k] = v end
  local cli, err, took = timed(function() return etcd3.new(config) end)
  if cli then
    assert.is_true(expect.connects, name .. ": etcd3.new succeeded")
    report(name, "new", "connected (an HTTP/2 peer)", took)
    cli:close()
  else
    assert.is_true(etcd3.is_error(err), name .. ": " .. tostring(err))
    assert.are.equal("UNAVAILABLE", err.code)
    report(name, "new", err, took)
    assert.is_true(took < DIAL + SLACK, ("%s: new took %.2fs"):format(name, took))
    assert.is_nil(expect.connects, name .. ": etcd3.new failed")
    assert.matches("no endpoint answered within dial_timeout", err.message, 1, true)
    assert.matches(expect.why, err.message)
  end

  config.dial_timeout, config.timeout = 0, TIMEOUT
  local lazy = assert(etcd3.new(config))
  for _, call in ipairs(CALLS) do
    local res, cerr, ctook = timed(function() return call[2](lazy) end)
    assert.is_nil(res, name .. ": " .. call[1] .. " succeeded")
    assert.is_true(etcd3.is_error(cerr), name .. ": " .. call[1] .. ": " .. tostring(cerr))
    report(name, call[1], cerr, ctook)
    assert.is_true(ctook < TIMEOUT + SLACK, ("%s: %s took %.2fs"):format(name, call[1], ctook))
    if call.watch then
      assert.are.equal("DEADLINE_EXCEEDED", cerr.code)
      assert.matches("etcd did not confirm the watch in time %(.*" .. expect.why, cerr.message)
    else
      assert.matches(expect.call, tostring(cerr))
    end
  end
  lazy:close()
end

-- In a coroutine of its own: once it is done, nothing of it (LuaJIT's
-- stale stack slots included) keeps a closed client from being collected.
local function run(name, endpoint, expect)
  local co = coroutine.create(exercise)
  local ok, err = coroutine.resume(co, name, endpoint, expect)
  if not ok then error(err, 0) end
end

--- Runs the checks twice and counts threads and fds around the second
-- run: the first meets this kind of failure with gRPC's process-wide
-- machinery (its event engine's poller and wakeup fd come and go with its
-- timers), so what the second leaves behind is what a client leaks.
local function wrong_peer(name, endpoint, expect)
  run(name, endpoint, expect)
  local before = resources()
  run(name, endpoint, expect)
  assert_released(before)
end

describe("a wrong peer", function()
  setup(function()
    -- gRPC's process-wide threads (executors, timers, event engine) start
    -- with the first clients and stay: counts are taken after a refused
    -- connection and a call that ran into its deadline have come and gone.
    local p = peer.start("silent")
    for _, ep in ipairs { "127.0.0.1:1", p.endpoint } do
      local cli = assert(etcd3.new { endpoints = ep, dial_timeout = 0, timeout = 0.3 })
      cli:get("/k")
      cli:close()
    end
    p:stop()
  end)

  it("that accepts and never speaks: new and every call end at their deadline", function()
    local p = peer.start("silent")
    finally(function() p:stop() end)
    wrong_peer("silent", p.endpoint, { why = "still connecting", call = "DEADLINE_EXCEEDED" })
  end)

  it("that sends random bytes: UNAVAILABLE", function()
    local p = peer.start("random")
    finally(function() p:stop() end)
    wrong_peer("random bytes", p.endpoint, { why = "HTTP/2", call = "UNAVAILABLE" })
  end)

  it("that closes after accepting: UNAVAILABLE", function()
    local p = peer.start("close")
    finally(function() p:stop() end)
    wrong_peer("closes", p.endpoint, { why = "last error: UNAVAILABLE", call = "UNAVAILABLE" })
  end)

  it("that speaks HTTP/1.1 (nginx): UNAVAILABLE", function()
    local n = nginx.start("server { listen 127.0.0.1:${PORT}; location / { return 200 'not etcd'; } }")
    finally(function() n:stop() end)
    wrong_peer("http/1.1 nginx", "127.0.0.1:" .. n.port, { why = "http1.x server", call = "UNAVAILABLE" })
  end)

  it("that is a gRPC server but not etcd: UNIMPLEMENTED", function()
    local p = peer.start("grpc")
    finally(function() p:stop() end)
    wrong_peer("grpc, not etcd", p.endpoint, { connects = true, why = "Method not found", call = "UNIMPLEMENTED" })
  end)

  describe("on the other side of TLS", function()
    local certs, tls_member, plain_member
    setup(function()
      certs = certs_helper.make()
      tls_member = helper.single { tls = { cert = certs.server_cert, key = certs.server_key } }
      plain_member = helper.single()
    end)
    teardown(function()
      if tls_member then tls_member:stop() end
      if plain_member then plain_member:stop() end
      if certs then certs.remove() end
    end)

    it("a TLS etcd spoken to in plaintext: UNAVAILABLE", function()
      wrong_peer("plaintext to TLS etcd", "http://" .. tls_member.endpoint,
        { why = "last error: UNAVAILABLE", call = "UNAVAILABLE" })
    end)

    it("a plaintext etcd spoken to with TLS: UNAVAILABLE", function()
      wrong_peer("TLS to plaintext etcd", "https://" .. plain_member.endpoint,
        { why = "last error: UNAVAILABLE", call = "UNAVAILABLE", config = { tls = { ca = certs.ca } } })
    end)
  end)
end)

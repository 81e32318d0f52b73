--- Real etcd members for the specs, on 127.0.0.1 only.
--
-- Each member gets free ports (read from /proc/net/tcp{,6}), a data dir of
-- its own under a temp dir, and is stopped by the PID this helper started.
-- Every PID is also appended to $ETCD3_SPEC_PIDFILE (when set), so the test
-- runner can stop what a crashed spec run left behind, by PID. The pieces
-- (free ports, starting and killing a member) are etcd3.testing's, the
-- module users get; this file adds what only the specs need.
local parts = require("etcd3.testing").parts

local _M = {}

-- Under the sanitizer run, LD_PRELOAD carries the ASan runtime: it is for
-- the Lua process only, never for etcd, etcdctl or the shell tools.
local PRELOAD = os.getenv("LD_PRELOAD")
--- True in the sanitizer run: ASan's quarantine makes RSS meaningless there
-- (LeakSanitizer checks for leaks instead).
_M.sanitized = PRELOAD ~= nil and PRELOAD:find("asan", 1, true) ~= nil

--- The environment a child Lua process runs with ("VAR=value ..."): the
-- ASan runtime in the sanitizer run, with ASan's and UBSan's checks but no
-- leak check at its exit. Leaks are checked in the spec process, which runs
-- the same module code; LeakSanitizer's exit-time tracer now and then
-- crashes by itself in a process with many threads ("Tracer caught signal
-- 11", google/sanitizers#1353), which failed a child that had done nothing
-- wrong.
local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
_M.child_env = "LD_PRELOAD=" .. q(PRELOAD or "")
if _M.sanitized then
  _M.child_env = _M.child_env .. " ASAN_OPTIONS=" .. q((os.getenv("ASAN_OPTIONS") or "") .. ":detect_leaks=0")
end

-- etcd3.testing's: they run without LD_PRELOAD (see above)
local sh, capture = parts.sh, parts.capture
_M.capture, _M.sh = capture, sh

--- A shell command that runs `script` in this runtime, with this run's
-- package paths.
function _M.lua_command(script)
  local interp = jit and "luajit" or "lua5.4"
  return ("%s LUA_PATH=%s LUA_CPATH=%s %s -e %s"):format(_M.child_env,
    q(package.path), q(package.cpath), interp, q(script))
end

local function now()
  return require("etcd3.core").now()
end
_M.now = now

_M.free_port, _M.wait_for = parts.free_port, parts.wait_for

--- Stops a process this run started: `signal` (TERM by default), then
-- KILL when it is still there after `grace` seconds.
function _M.stop_process(pid, signal, grace)
  _M.sh("kill -" .. (signal or "TERM") .. " " .. pid .. " 2>/dev/null")
  local gone = pcall(_M.wait_for, function() return not _M.sh("kill -0 " .. pid .. " 2>/dev/null") end, grace)
  if not gone then _M.sh("kill -9 " .. pid .. " 2>/dev/null") end
end

--- Appends a PID this run started to $ETCD3_SPEC_PIDFILE (when set).
local function record_pid(pid)
  local file = os.getenv("ETCD3_SPEC_PIDFILE")
  if file then
    local f = io.open(file, "a")
    if f then f:write(pid, "\n"); f:close() end
  end
end
_M.record_pid = record_pid

--- A member: etcd3.testing's (start, signal, kill, stop), with etcdctl.
local Member = setmetatable({}, { __index = parts.Member })
Member.__index = Member

--- etcdctl's flags to reach this member (TLS members: the test CA and
-- client certificate, or no verification for the deliberately bad ones).
function Member:etcdctl_flags()
  local flags = "--endpoints=" .. self.scheme .. "://" .. self.endpoint
  local tls = self.tls
  if tls then
    flags = flags .. " --insecure-transport=false --insecure-skip-tls-verify"
    if tls.client_cert then
      flags = flags .. " --cert=" .. tls.client_cert .. " --key=" .. tls.client_key
    end
  end
  if self.auth then flags = flags .. " --user=" .. self.auth end
  return flags
end

function Member:etcdctl(args)
  return capture("ETCDCTL_API=3 etcdctl " .. self:etcdctl_flags() ..
    " --command-timeout=3s " .. args .. " 2>&1")
end

function Member:healthy()
  return sh("ETCDCTL_API=3 etcdctl " .. self:etcdctl_flags() ..
    " --command-timeout=1s endpoint health >/dev/null 2>&1")
end

function Member:wait_healthy(timeout)
  _M.wait_for(function() return self:healthy() end, timeout or 20, "etcd " .. self.endpoint)
  return self
end

--- A member in a temp dir of its own, its PID recorded when it starts.
local function new_member(name, token, opts)
  local dir = capture("mktemp -d /tmp/etcd3-spec.XXXXXX"):gsub("%s+$", "")
  local m = setmetatable(parts.new_member(name, token, dir, opts.tls), Member)
  m.own_dir, m.on_start = true, record_pid
  return m
end

--- Starts `n` members (default 1) as one cluster; waits until healthy.
-- opts.extra: more etcd flags for every member.
-- opts.peer_proxy(member): starts something in front of the member's peer
-- port (member.peer_url) and returns the URL the other members reach it by.
-- Returns { members = {...}, endpoints = {...}, stop = fn, [1] = member 1 … }
function _M.cluster(n, opts)
  n, opts = n or 1, opts or {}
  local token = "spec-" .. _M.free_port()
  local members, peers, endpoints = {}, {}, {}
  for i = 1, n do
    local m = new_member("m" .. i, token, opts)
    m.extra = opts.extra
    if opts.peer_proxy then
      m.peer_listen = m.peer_url
      m.peer_url = opts.peer_proxy(m)
    end
    members[i], endpoints[i] = m, m.endpoint
    peers[i] = m.name .. "=" .. m.peer_url
  end
  for _, m in ipairs(members) do
    m.initial_cluster = table.concat(peers, ",")
    m:start()
  end
  for _, m in ipairs(members) do m:wait_healthy() end
  local c = { members = members, endpoints = endpoints }
  if opts.tls then
    for i, m in ipairs(members) do c.endpoints[i] = "https://" .. m.endpoint end
  end
  function c.stop()
    for _, m in ipairs(members) do m:stop() end
  end
  return c
end

--- The index of the cluster's leader among cluster.members, as the
-- members say (waits for one to be elected).
function _M.leader_index(cluster)
  return _M.wait_for(function() return parts.leader_of(cluster.members) end, 20, "a leader")
end

--- A follower's index, and the endpoints with that follower first (a
-- client's streams start there) and the other members after it.
function _M.follower_first(cluster)
  local follower = _M.leader_index(cluster) % #cluster.members + 1
  local endpoints = { cluster.members[follower].endpoint }
  for i, m in ipairs(cluster.members) do
    if i ~= follower then endpoints[#endpoints + 1] = m.endpoint end
  end
  return follower, endpoints
end

--- A member that joins a running cluster (after member_add): same token,
-- the initial cluster etcd's member_add answer describes.
function _M.joining(cluster, name, initial_cluster, peer_url, opts)
  local m = new_member(name, cluster.members[1].token, opts or {})
  m.peer_url = peer_url
  m.initial_cluster = initial_cluster
  m.state = "existing"
  cluster.members[#cluster.members + 1] = m
  return m
end

--- A peer URL on a free port, for member_add.
function _M.peer_url() return "http://127.0.0.1:" .. _M.free_port() end

--- One member: the member itself, with :stop().
function _M.single(opts)
  return _M.cluster(1, opts).members[1]
end

--- For a describe block: setup and teardown functions that start a member
-- and a client to it, handed to `set(member, client)`, and stop them by
-- PID (busted's setup/teardown are the spec file's, so the spec registers
-- them: `setup(start) teardown(stop)`). `opts` as for single(); `config`:
-- more etcd3.new options than the member's endpoint.
function _M.member_and_client(set, opts, config)
  local member, client
  local function start()
    member = _M.single(opts)
    local c = { endpoints = member.endpoint }
    for k, v in pairs(config or {}) do c[k] = v end
    client = assert(require("etcd3").new(c))
    set(member, client)
  end
  local function stop()
    if client then client:close() end
    if member then member:stop() end
  end
  return start, stop
end

--- Base64 decoding, for `etcdctl -w json` output.
function _M.unbase64(s)
  local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  local bits = s:gsub("[^%w%+/=]", ""):gsub("=", ""):gsub(".", function(c)
    local v = alphabet:find(c, 1, true) - 1
    local out = {}
    for i = 5, 0, -1 do out[#out + 1] = math.floor(v / 2 ^ i) % 2 end
    return table.concat(out)
  end)
  bits = bits:sub(1, #bits - #bits % 8)
  return (bits:gsub("%d%d%d%d%d%d%d%d", function(byte)
    return string.char(tonumber(byte, 2))
  end))
end

return _M

--- Real etcd members for the specs, on 127.0.0.1 only.
--
-- Each member gets free ports (read from /proc/net/tcp{,6}), a data dir of
-- its own under a temp dir, and is stopped by the PID this helper started.
-- Every PID is also appended to $ETCD3_SPEC_PIDFILE (when set), so the test
-- runner can stop what a crashed spec run left behind, by PID.
local _M = {}

-- Under the sanitizer run, LD_PRELOAD carries the ASan runtime: it is for
-- the Lua process only, never for etcd, etcdctl or the shell tools.
local PRELOAD = os.getenv("LD_PRELOAD")
local CLEAN = PRELOAD and "unset LD_PRELOAD; " or ""
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

local function sh(cmd)
  cmd = CLEAN .. cmd
  local ok = os.execute(cmd)
  return ok == true or ok == 0
end

local function capture(cmd)
  cmd = CLEAN .. cmd
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("*a")
  p:close()
  return out
end
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

--- Ports something already holds, in any TCP state.
local function used_ports()
  local used = {}
  for _, path in ipairs { "/proc/net/tcp", "/proc/net/tcp6" } do
    local f = io.open(path)
    if f then
      for line in f:lines() do
        local port = line:match("^%s*%d+:%s+%x+:(%x+)")
        if port then used[tonumber(port, 16)] = true end
      end
      f:close()
    end
  end
  return used
end

local taken = {}
math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)

--- A TCP port on 127.0.0.1 that nothing listens on or uses right now.
function _M.free_port()
  local used = used_ports()
  for _ = 1, 1000 do
    local p = math.random(20000, 45000)
    if not used[p] and not taken[p] then
      taken[p] = true
      return p
    end
  end
  error("no free port found")
end

--- Waits for cond() to be true; fails after `timeout` seconds.
function _M.wait_for(cond, timeout, what)
  local deadline = now() + (timeout or 10)
  while true do
    local v = cond()
    if v then return v end
    if now() > deadline then error("timed out waiting for " .. (what or "condition"), 2) end
    require("etcd3.core").sleep(0.05)
  end
end

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

local Member = {}
Member.__index = Member

--- (Re)starts this member's etcd process with its own ports and data dir.
function Member:start()
  local args = {
    "etcd", "--name", self.name, "--data-dir", self.dir .. "/data",
    "--listen-client-urls", self.scheme .. "://" .. self.endpoint,
    "--advertise-client-urls", self.scheme .. "://" .. self.endpoint,
    "--listen-peer-urls", self.peer_listen or self.peer_url,
    "--initial-advertise-peer-urls", self.peer_url,
    "--initial-cluster", self.initial_cluster,
    "--initial-cluster-token", self.token,
    "--initial-cluster-state", self.state or "new",
  }
  local tls = self.tls
  if tls then
    for _, a in ipairs { "--cert-file", tls.cert, "--key-file", tls.key } do args[#args + 1] = a end
    if tls.client_auth then
      for _, a in ipairs { "--trusted-ca-file", tls.ca, "--client-cert-auth" } do args[#args + 1] = a end
    end
  end
  for _, a in ipairs(self.extra or {}) do args[#args + 1] = a end
  for i, a in ipairs(args) do args[i] = "'" .. a:gsub("'", "'\\''") .. "'" end
  local cmd = table.concat(args, " ") .. " >>" .. self.dir .. "/etcd.log 2>&1 & echo $!"
  self.pid = assert(tonumber(capture(cmd)), "etcd did not start")
  record_pid(self.pid)
  return self
end

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

function Member:signal(sig)
  if self.pid then sh("kill -" .. sig .. " " .. self.pid .. " 2>/dev/null") end
end

--- Kills the process (SIGKILL) and waits until it is gone.
function Member:kill()
  if not self.pid then return end
  self:signal("CONT")
  self:signal("KILL")
  local pid = self.pid
  _M.wait_for(function() return not sh("kill -0 " .. pid .. " 2>/dev/null") end, 10, "etcd to exit")
  self.pid = nil
end

--- Stops the process (if any) and removes the data dir.
function Member:stop()
  self:kill()
  if self.dir and self.dir:match("^/tmp/") then sh("rm -rf '" .. self.dir .. "'") end
end

local function new_member(name, token, opts)
  local dir = capture("mktemp -d /tmp/etcd3-spec.XXXXXX"):gsub("%s+$", "")
  return setmetatable({
    name = name, dir = dir, token = token, tls = opts.tls,
    scheme = opts.tls and "https" or "http",
    endpoint = "127.0.0.1:" .. _M.free_port(),
    peer_url = "http://127.0.0.1:" .. _M.free_port(),
  }, Member)
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
  local index
  _M.wait_for(function()
    for i, m in ipairs(cluster.members) do
      local c = assert(require("etcd3").new { endpoints = m.endpoint })
      local st = c:status()
      c:close()
      if st and st.leader == st.header.member_id then index = i end
    end
    return index ~= nil
  end, 20, "a leader")
  return index
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

--- Throwaway etcd for tests: `start` runs 1 or 3 etcd members on free
-- 127.0.0.1 ports, in a temporary directory of their own, from `etcd` on
-- PATH (or $ETCD_BIN), and `stop` (or the garbage collector, or a
-- `local c <close>`) stops exactly the processes it started, by PID, and
-- removes everything it made.
--
--   local t = require "etcd3.testing"
--   local c = t.start { members = 3 }     -- auth = { "root", "pw" }, tls = true
--   local cli = c:client()
--   c:kill(c:leader()); c:restart(i); c:freeze(i); c:thaw(i)
--   c:stop()
--
-- It needs a POSIX shell, `mktemp`, `kill`, `rm`, and `openssl` for TLS.
-- Processes it starts run without LD_PRELOAD: a preloaded library (a
-- sanitizer runtime, say) is meant for the Lua process, not for etcd.
local core = require "etcd3.core"

local now, sleep = core.now, core.sleep
local concat = table.concat

local _M = { _VERSION = "0.1" }

local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

--- Runs a shell command; true when it exits with status 0.
local function sh(cmd)
  local ok = os.execute("unset LD_PRELOAD; " .. cmd)
  return ok == true or ok == 0 -- 5.1 returns the status, 5.2+ true/nil
end

--- Runs a shell command; its standard output.
local function capture(cmd)
  local p = assert(io.popen("unset LD_PRELOAD; " .. cmd, "r"))
  local out = p:read("*a")
  p:close()
  return out
end

--- Waits for cond() to return a true value and returns it; raises after
-- `timeout` seconds (default 10), naming `what`.
local function wait_for(cond, timeout, what)
  local deadline = now() + (timeout or 10)
  while true do
    local v = cond()
    if v then return v end
    if now() > deadline then error("timed out waiting for " .. (what or "condition"), 2) end
    sleep(0.05)
  end
end

--- Whether process `pid` still runs (a zombie left for its reaper does not).
local function running(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return sh("kill -0 " .. pid .. " 2>/dev/null") end
  local stat = f:read("*a") or ""
  f:close()
  return stat:match("^%d+ %b() (%a)") ~= "Z"
end

--- Ports something already holds on this machine, in any TCP state.
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

local handed_out = {} -- ports this process gave out already
math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)

--- A TCP port on 127.0.0.1 that nothing listens on or uses right now.
local function free_port()
  local used = used_ports()
  for _ = 1, 1000 do
    local p = math.random(20000, 45000)
    if not used[p] and not handed_out[p] then
      handed_out[p] = true
      return p
    end
  end
  error("no free port found")
end

--- A new directory under $TMPDIR (or /tmp) named `prefix.XXXXXX`.
local function temp_dir(prefix)
  local dir = capture("mktemp -d \"${TMPDIR:-/tmp}\"/" .. prefix .. ".XXXXXX"):gsub("%s+$", "")
  assert(dir ~= "", "mktemp failed")
  return dir
end

--- Removes a directory a temp_dir() call made (and nothing else).
local function remove_dir(dir)
  if dir and dir:match("/etcd3%-[%w%-]+%.%w+$") then sh("rm -rf " .. quote(dir)) end
end

--- Sends SIGKILL to a process this module started (waking it first when
-- frozen) and waits until it is gone.
local function kill_process(pid)
  sh("kill -CONT " .. pid .. " 2>/dev/null; kill -KILL " .. pid .. " 2>/dev/null")
  wait_for(function() return not running(pid) end, 30, "process " .. pid .. " to exit")
end

-- ---------------------------------------------------------------------------
-- Certificates (openssl's command line), into a directory
-- ---------------------------------------------------------------------------

local function openssl(dir, cmd)
  assert(sh("cd " .. quote(dir) .. " && openssl " .. cmd .. " >/dev/null 2>&1"), "openssl failed: " .. cmd)
end

--- A self-signed CA: dir/name.pem and dir/name.key.
local function certificate_authority(dir, name)
  openssl(dir, ("req -x509 -newkey rsa:2048 -nodes -keyout %s.key -out %s.pem -days 3650 -subj /CN=%s"):format(
    name, name, name))
end

--- dir/name.pem and .key signed by the CA `by`, for the subjectAltName
-- `san`, valid `days` (0: expires at once).
local function certificate(dir, name, by, san, days)
  openssl(dir, ("req -newkey rsa:2048 -nodes -keyout %s.key -out %s.csr -subj /CN=%s"):format(name, name, name))
  local f = assert(io.open(dir .. "/" .. name .. ".ext", "w"))
  f:write("subjectAltName=" .. san .. "\n")
  f:close()
  openssl(dir, ("x509 -req -in %s.csr -CA %s.pem -CAkey %s.key -CAcreateserial -out %s.pem -days %d -extfile %s.ext")
    :format(name, by, by, name, days, name))
end

-- ---------------------------------------------------------------------------
-- Member: one etcd process, its ports and its data dir
-- ---------------------------------------------------------------------------

--- Fields: name, dir (its data lives in dir/data, its log in dir/etcd.log),
-- scheme ("http" or "https"), endpoint ("127.0.0.1:port"), peer_url,
-- peer_listen (when something stands in front of peer_url), initial_cluster,
-- token, state ("new" or "existing"), tls ({ cert, key, ca, client_auth }),
-- extra (more etcd flags), on_start(pid), pid (while it runs).
local Member = {}
Member.__index = Member

--- (Re)starts this member's etcd process with its ports and data dir.
function Member:start()
  local args = {
    os.getenv("ETCD_BIN") or "etcd", "--name", self.name, "--data-dir", self.dir .. "/data",
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
  for i, a in ipairs(args) do args[i] = quote(a) end
  local cmd = concat(args, " ") .. " >>" .. quote(self.dir .. "/etcd.log") .. " 2>&1 </dev/null & echo $!"
  self.pid = assert(tonumber(capture(cmd)), "etcd did not start")
  if self.on_start then self.on_start(self.pid) end
  return self
end

--- Whether every thread of process `pid` is stopped (by SIGSTOP).
local function stopped(pid)
  local states = capture("cat /proc/" .. pid .. "/task/*/stat 2>/dev/null")
  local any = false
  for state in states:gmatch("%d+ %b() (%a)") do
    if state ~= "T" and state ~= "t" then return false end
    any = true
  end
  return any
end

--- Sends `sig` ("STOP", "CONT", …) to the process, when it runs. After
-- STOP it returns once every thread has stopped: kill() only queues the
-- signal, and a thread busy on another CPU still answers a request or two
-- before it notices.
function Member:signal(sig)
  if not self.pid then return end
  sh("kill -" .. sig .. " " .. self.pid .. " 2>/dev/null")
  if sig == "STOP" and running(self.pid) then
    wait_for(function() return stopped(self.pid) end, 10, "etcd " .. self.pid .. " to stop")
  end
end

--- Kills the process (SIGKILL) and waits until it is gone.
function Member:kill()
  if not self.pid then return end
  kill_process(self.pid)
  self.pid = nil
end

--- Kills the process; removes the member's directory when it has one of
-- its own (own_dir).
function Member:stop()
  self:kill()
  if self.own_dir then remove_dir(self.dir) end
end

--- A member named `name` of the cluster `token`, in `dir`, on free ports;
-- not started. `tls`: as the field above.
local function new_member(name, token, dir, tls)
  return setmetatable({
    name = name, dir = dir, token = token, tls = tls,
    scheme = tls and "https" or "http",
    endpoint = "127.0.0.1:" .. free_port(),
    peer_url = "http://127.0.0.1:" .. free_port(),
  }, Member)
end

--- The index in `members` of the one the members call their leader, or
-- nil when none answers so now. `config`: more etcd3.new options (TLS,
-- credentials). Killed and frozen members are passed over within a second.
local function leader_of(members, config)
  local etcd3 = require "etcd3"
  for i, m in ipairs(members) do
    local c = { dial_timeout = 1, timeout = 1 }
    for k, v in pairs(config or {}) do c[k] = v end
    c.endpoints = m.scheme .. "://" .. m.endpoint -- this member only
    local cli = etcd3.new(c)
    if cli then
      local st = cli:status()
      cli:close()
      if st and st.leader ~= 0 and st.leader == st.header.member_id then return i end
    end
  end
end

-- ---------------------------------------------------------------------------
-- Cluster: what start() returns
-- ---------------------------------------------------------------------------

local Cluster = {}
Cluster.__index = Cluster

--- etcd3.new's config for this cluster: endpoints, credentials, TLS files;
-- `config`'s fields added or replacing those.
function Cluster:config(config)
  local c = { endpoints = self.endpoints }
  if self.auth then c.user, c.password = self.auth[1] or self.auth.user, self.auth[2] or self.auth.password end
  if self.tls then c.tls = { ca = self.tls.ca, cert = self.tls.client_cert, key = self.tls.client_key } end
  for k, v in pairs(config or {}) do c[k] = v end
  return c
end

--- An etcd3 client of this cluster (see config); raises when none connects.
function Cluster:client(config)
  local cli, err = require("etcd3").new(self:config(config))
  if not cli then error("etcd3.testing: no client: " .. tostring(err), 2) end
  return cli
end

--- Whether member `i` serves requests and knows a leader.
function Cluster:healthy(i)
  local m = self.members[i]
  local cli = require("etcd3").new(self:config { endpoints = m.scheme .. "://" .. m.endpoint,
    dial_timeout = 1, timeout = 1 })
  if not cli then return false end
  local st = cli:status()
  cli:close()
  return st ~= nil and st.leader ~= 0
end

--- Waits until member `i` is healthy (`timeout` seconds, default 60).
function Cluster:wait_healthy(i, timeout)
  wait_for(function() return self:healthy(i) end, timeout or 60, "etcd " .. self.members[i].endpoint)
end

local function member(self, i)
  local m = self.members[i]
  if not m then error("etcd3.testing: no member " .. tostring(i), 3) end
  return m
end

--- Kills member `i` (SIGKILL) and waits until its process is gone.
function Cluster:kill(i) member(self, i):kill() end
--- Freezes member `i` (SIGSTOP): its connections stay open, it answers nothing.
function Cluster:freeze(i) member(self, i):signal("STOP") end
--- Lets a frozen member `i` go on (SIGCONT).
function Cluster:thaw(i) member(self, i):signal("CONT") end

--- Kills member `i` if it runs, starts it again on the same ports and
-- data, and waits until it is healthy.
function Cluster:restart(i)
  local m = member(self, i)
  m:kill()
  m:start()
  self:wait_healthy(i)
end

--- The index of the leader among the members (waits up to `timeout`
-- seconds, default 30, for one to be elected).
function Cluster:leader(timeout)
  return wait_for(function() return leader_of(self.members, self:config()) end, timeout or 30, "a leader")
end

--- Stops every process it started (by PID) and removes its directory.
-- Idempotent; also run by the garbage collector and by `<close>`.
function Cluster:stop()
  for _, m in ipairs(self.members) do m:kill() end
  if self.dir then remove_dir(self.dir) end
  self.dir = nil
end
Cluster.__gc = Cluster.stop
Cluster.__close = Cluster.stop

--- Creates the root user (and `user`, when another) with `password` and
-- enables authentication.
local function enable_auth(cluster, user, password)
  local admin = cluster:client() -- no credentials yet: auth is off
  local function must(ok, err) if not ok then error("etcd3.testing: auth set-up: " .. tostring(err), 3) end end
  for _, name in ipairs(user == "root" and { "root" } or { "root", user }) do
    must(admin:user_add(name, password))
    must(admin:user_grant_role(name, "root"))
  end
  must(admin:auth_enable())
  admin:close()
end

--- Starts a throwaway etcd and waits until every member is healthy.
-- opts.members: 1 (default) or 3; opts.auth: { user, password } (or
-- { user = , password = }) enables authentication; opts.tls: true makes a
-- CA, a server and a client certificate and serves https with client
-- certificates demanded; opts.extra: more etcd flags; opts.on_start(pid):
-- called with each etcd PID started (to record them, say).
function _M.start(opts)
  opts = opts or {}
  local n = opts.members or 1
  if n ~= 1 and n ~= 3 then error("etcd3.testing.start: members must be 1 or 3", 2) end
  local dir = temp_dir("etcd3-testing")
  local self = setmetatable({ dir = dir, members = {}, endpoints = {} }, Cluster)
  -- Lua 5.1 and LuaJIT run no __gc of tables: a proxy's does it for them
  if newproxy then -- luacheck: ignore
    self._gc = newproxy(true) -- luacheck: ignore
    getmetatable(self._gc).__gc = function() self:stop() end
  end
  local ok, err = pcall(function()
    if opts.tls then
      local tls = { ca = dir .. "/ca.pem", cert = dir .. "/server.pem", key = dir .. "/server.key",
        client_cert = dir .. "/client.pem", client_key = dir .. "/client.key", client_auth = true }
      certificate_authority(dir, "ca")
      certificate(dir, "server", "ca", "IP:127.0.0.1,DNS:localhost", 3650)
      certificate(dir, "client", "ca", "DNS:client", 3650)
      self.tls = tls
    end
    local token, peers = "etcd3-testing-" .. free_port(), {}
    for i = 1, n do
      local m_dir = dir .. "/m" .. i
      assert(sh("mkdir " .. quote(m_dir)), "mkdir failed")
      local m = new_member("m" .. i, token, m_dir, self.tls)
      m.extra, m.on_start = opts.extra, opts.on_start
      self.members[i], self.endpoints[i] = m, m.scheme .. "://" .. m.endpoint
      peers[i] = m.name .. "=" .. m.peer_url
    end
    for _, m in ipairs(self.members) do
      m.initial_cluster = concat(peers, ",")
      m:start()
    end
    for i = 1, n do self:wait_healthy(i) end
    if opts.auth then
      local user, password = opts.auth[1] or opts.auth.user, opts.auth[2] or opts.auth.password
      enable_auth(self, user, password)
      self.auth = { user, password }
    end
  end)
  if not ok then
    self:stop()
    error(err, 2)
  end
  return self
end

--- The building blocks start() is made of, for the project's own spec
-- helpers (spec/helpers/): not a stable API.
_M.parts = {
  quote = quote, sh = sh, capture = capture, wait_for = wait_for, running = running, free_port = free_port,
  temp_dir = temp_dir, remove_dir = remove_dir, kill_process = kill_process, Member = Member,
  new_member = new_member, leader_of = leader_of,
  certificate_authority = certificate_authority, certificate = certificate,
}

return _M

--- A TCP fault proxy on 127.0.0.1 (spec/helpers/proxy.py, a child
-- process stopped by its PID): it forwards to an etcd member's client or
-- peer port and, on command, black-holes (connections stay open, nothing
-- is forwarded, nothing refused), delays each way, or resets every open
-- connection; stopped, it refuses new connections, and started again it
-- listens on the same port.
local helper = require "spec.helpers.etcd"
local process = require "spec.helpers.process"

local _M = {}

local PYTHON = "/usr/bin/python3"

local Proxy = {}
Proxy.__index = Proxy

--- Starts (again) listening on its port.
function Proxy:start()
  self.log = self.log or helper.capture("mktemp /tmp/etcd3-spec-proxy.XXXXXX"):gsub("%s+$", "")
  local cmd = ("%s %s %d %d %d %s %s >%s 2>&1 </dev/null & echo $!"):format(PYTHON, _M.script,
    self.port, self.target_port, self.control_port, self.delay, self.peer and "peer" or "", self.log)
  self.pid = assert(tonumber(helper.capture(cmd)))
  helper.record_pid(self.pid)
  helper.wait_for(function()
    local f = io.open(self.log)
    local out = f and f:read("*a") or ""
    if f then f:close() end
    return out:find("listening", 1, true)
  end, 10, "the proxy to listen")
  return self
end

--- Sends one command (proxy.py lists them); returns its answer once it is
-- in force.
function Proxy:command(line)
  assert(self.pid, "the proxy is stopped")
  local script = ("exec 3<>/dev/tcp/127.0.0.1/%d && echo '%s' >&3 && read -r reply <&3 && echo \"$reply\"")
    :format(self.control_port, line)
  local reply = helper.capture("bash -c '" .. script:gsub("'", "'\\''") .. "' 2>&1"):gsub("%s+$", "")
  assert(not reply:find("^error") and reply ~= "", "proxy command '" .. line .. "': " .. reply)
  return reply
end

--- Nothing more goes through, either way, on open or new connections; with
-- `member_id` (hex), only on the connections that etcd member opened (a
-- "peer" proxy).
function Proxy:blackhole(member_id)
  self:command(member_id and "blackhole-from " .. member_id or "blackhole")
end

--- Every chunk waits `up` seconds to reach the target and `down` seconds
-- to come back.
function Proxy:set_delay(up, down)
  self:command(("delay %.3f %.3f"):format(up, down))
end

--- Resets (RST) every open connection, both sides; new ones go through.
function Proxy:cut() self:command("cut") end

--- No black hole, the delay it started with; what was held goes on.
function Proxy:heal() self:command("heal") end

--- The number of connections open through it.
function Proxy:connections() return tonumber(self:command("count")) end

--- Kills it: every connection through it breaks, new ones are refused.
function Proxy:stop()
  if self.pid then
    helper.sh("kill -KILL " .. self.pid)
    local pid = self.pid
    helper.wait_for(function() return not process.running(pid) end, 10, "the proxy to exit")
    self.pid = nil
  end
  if self.log then os.remove(self.log) end
  self.log = nil
end

--- A proxy from a free port to `endpoint` ("127.0.0.1:port").
-- opts.delay: seconds by which everything etcd sends reaches the client
-- late (in order; what the client sends goes through at once).
-- opts.peer: in front of a peer port (it tells the members' connections
-- apart, for blackhole(member_id)).
function _M.start(endpoint, opts)
  opts = opts or {}
  local p = setmetatable({
    port = helper.free_port(), control_port = helper.free_port(),
    target_port = tonumber(endpoint:match(":(%d+)$")),
    delay = ("%.3f"):format(opts.delay or 0), peer = opts.peer,
  }, Proxy)
  p.endpoint = "127.0.0.1:" .. p.port
  return p:start()
end

_M.script = helper.capture("pwd"):gsub("%s+$", "") .. "/spec/helpers/proxy.py"

return _M

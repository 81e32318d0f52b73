--- A TCP proxy on 127.0.0.1 in a child process (cqueues), to cut a
-- client's connections to etcd and bring them back on the same port,
-- while etcd itself keeps serving other clients. Stopped by its PID.
local helper = require "spec.helpers.etcd"
local process = require "spec.helpers.process"

local _M = {}

local SCRIPT = [[
local cqueues = require "cqueues"
local socket = require "cqueues.socket"
local srv = assert(socket.listen { host = "127.0.0.1", port = %d, reuseaddr = true })
assert(srv:listen()) -- bound and listening before "listening" is printed
local cq = cqueues.new()
local function pump(from, to)
  while true do
    local data = from:read("-65536")
    if not data then break end
    if not to:write(data) then break end
    to:flush()
  end
  pcall(to.shutdown, to, "w")
end
cq:wrap(function()
  for con in srv:clients() do
    cq:wrap(function()
      local up = socket.connect("127.0.0.1", %d)
      con:setmode("bn", "bn")
      up:setmode("bn", "bn")
      cq:wrap(function() pump(con, up) end)
      pump(up, con)
    end)
  end
end)
io.stdout:write("listening\n")
io.stdout:flush()
assert(cq:loop())
]]

local Proxy = {}
Proxy.__index = Proxy

--- Starts (again) listening on its port.
function Proxy:start()
  -- (its own interpreter and cqueues, without the sanitizer run's preload:
  -- it never loads etcd3.core)
  local cmd = (jit and "luajit" or "lua5.4") .. " -e " .. process.quote(SCRIPT:format(self.port, self.target_port))
  self.log = self.log or helper.capture("mktemp /tmp/etcd3-spec-proxy.XXXXXX"):gsub("%s+$", "")
  self.pid = assert(tonumber(helper.capture(cmd .. " >" .. self.log .. " 2>&1 </dev/null & echo $!")))
  helper.wait_for(function()
    local f = io.open(self.log)
    local out = f and f:read("*a") or ""
    if f then f:close() end
    return out:find("listening", 1, true)
  end, 10, "the proxy to listen")
  return self
end

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
function _M.start(endpoint)
  local p = setmetatable({ port = helper.free_port(), target_port = tonumber(endpoint:match(":(%d+)$")) }, Proxy)
  p.endpoint = "127.0.0.1:" .. p.port
  return p:start()
end

return _M

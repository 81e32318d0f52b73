--- A TCP proxy on 127.0.0.1 in a child process (cqueues), to cut a
-- client's connections to etcd and bring them back on the same port,
-- while etcd itself keeps serving other clients, or to make etcd's answers
-- arrive late. Stopped by its PID.
local helper = require "spec.helpers.etcd"
local process = require "spec.helpers.process"

local _M = {}

local SCRIPT = [[
local cqueues = require "cqueues"
local condition = require "cqueues.condition"
local socket = require "cqueues.socket"
local DELAY = %s
local srv = assert(socket.listen { host = "127.0.0.1", port = %d, reuseaddr = true })
assert(srv:listen()) -- bound and listening before "listening" is printed
local cq = cqueues.new()
local function send(to, data)
  if not to:write(data) then return false end
  to:flush()
  return true
end
-- Copies `from` to `to`, each read handed on `delay` seconds after it came.
local function pump(from, to, delay)
  local queue, head, tail, more = {}, 1, 0, condition.new()
  if delay > 0 then
    cq:wrap(function()
      while true do
        while head > tail do more:wait() end
        local item = queue[head]
        queue[head], head = nil, head + 1
        local wait = item.at + delay - cqueues.monotime()
        if wait > 0 then cqueues.sleep(wait) end
        if not item.data or not send(to, item.data) then break end
      end
      pcall(to.shutdown, to, "w")
    end)
  end
  while true do
    local data = from:read("-65536")
    if delay > 0 then
      tail = tail + 1
      queue[tail] = { at = cqueues.monotime(), data = data }
      more:signal()
      if not data then return end
    elseif not data or not send(to, data) then
      break
    end
  end
  pcall(to.shutdown, to, "w")
end
cq:wrap(function()
  for con in srv:clients() do
    cq:wrap(function()
      local up = socket.connect("127.0.0.1", %d)
      con:setmode("bn", "bn")
      up:setmode("bn", "bn")
      cq:wrap(function() pump(con, up, 0) end)
      pump(up, con, DELAY)
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
  local cmd = (jit and "luajit" or "lua5.4") .. " -e " .. process.quote(SCRIPT:format(self.delay, self.port, self.target_port))
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
-- opts.delay: seconds by which everything etcd sends reaches the client
-- late (in order; what the client sends goes through at once).
function _M.start(endpoint, opts)
  local p = setmetatable({
    port = helper.free_port(), target_port = tonumber(endpoint:match(":(%d+)$")),
    delay = string.format("%.3f", opts and opts.delay or 0),
  }, Proxy)
  p.endpoint = "127.0.0.1:" .. p.port
  return p:start()
end

return _M

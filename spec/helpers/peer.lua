--- Wrong peers (spec/helpers/peer.py): something on 127.0.0.1 that is not
-- etcd, started as a child process on a free port and stopped by its PID.
local helper = require "spec.helpers.etcd"

local _M = {}

-- Debian's python3, whose python3-grpcio the gRPC peers need.
local PYTHON = "/usr/bin/python3"

local Peer = {}
Peer.__index = Peer

--- Starts a peer in `mode` (see peer.py); returns it once it listens.
function _M.start(mode)
  local dir = helper.capture("mktemp -d /tmp/etcd3-peer.XXXXXX"):gsub("%s+$", "")
  local script = helper.capture("pwd"):gsub("%s+$", "") .. "/spec/helpers/peer.py"
  local pid = assert(tonumber(helper.capture(("%s %s %s %s/port >%s/peer.log 2>&1 & echo $!"):format(
    PYTHON, script, mode, dir, dir))))
  helper.record_pid(pid)
  local self = setmetatable({ dir = dir, pid = pid, mode = mode }, Peer)
  local port = helper.wait_for(function()
    local f = io.open(dir .. "/port")
    if not f then return nil end
    local p = tonumber(f:read("*l"))
    f:close()
    return p
  end, 20, "peer " .. mode .. " to listen")
  self.port, self.endpoint = port, "127.0.0.1:" .. port
  return self
end

function Peer:stop()
  if self.pid then
    helper.stop_process(self.pid, "TERM", 5)
    self.pid = nil
  end
  if self.dir:match("^/tmp/") then helper.sh("rm -rf '" .. self.dir .. "'") end
end

return _M

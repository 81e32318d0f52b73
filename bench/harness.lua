-- What the benchmark scripts share: their "--name value" arguments and one
-- etcd member of their own with its data dir on tmpfs (bench/run.lua,
-- bench/scale.lua). The member is stopped by the PID this module started,
-- and that PID is also recorded in $ETCD3_SPEC_PIDFILE (when set), so the
-- test runner stops it if the script crashed.
local helper = require "spec.helpers.etcd"

local capture, sh = helper.capture, helper.sh
local tonumber, type, error, tostring = tonumber, type, error, tostring

local _M = {}

--- s quoted for sh.
function _M.quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
local q = _M.quote

--- The script's "--name value" arguments over `defaults` (a copy): a
-- number where the default is one; an unknown name raises.
function _M.options(args, defaults)
  local opts = {}
  for k, v in pairs(defaults) do opts[k] = v end
  local i = 1
  while i <= #args do
    local k = args[i]:match("^%-%-(.+)$")
    if not k or opts[k] == nil then error("unknown argument " .. tostring(args[i])) end
    opts[k] = type(opts[k]) == "number" and assert(tonumber(args[i + 1]), "--" .. k .. ": a number")
      or args[i + 1]
    i = i + 2
  end
  return opts
end

--- VmRSS in KiB of process `pid` (default: this one); nil when it is gone.
function _M.rss_kb(pid)
  local f = io.open("/proc/" .. (pid or "self") .. "/status")
  if not f then return nil end
  for line in f:lines() do
    local kb = line:match("^VmRSS:%s*(%d+)")
    if kb then f:close(); return tonumber(kb) end
  end
  f:close()
end

--- Starts one etcd member on 127.0.0.1 (free ports), its data dir on
-- /dev/shm, pinned to the CPUs `cpus` names ("0") when given; waits until
-- it answers. Returns { endpoint, pid, dir }.
function _M.start_etcd(cpus)
  local dir = capture("mktemp -d /dev/shm/etcd3-bench.XXXXXX"):gsub("%s+$", "")
  local port, peer = helper.free_port(), helper.free_port()
  local ep = "127.0.0.1:" .. port
  local pid = tonumber(capture(("%setcd --name bench --data-dir %s/data "
    .. "--listen-client-urls http://%s --advertise-client-urls http://%s "
    .. "--listen-peer-urls http://127.0.0.1:%d --initial-advertise-peer-urls http://127.0.0.1:%d "
    .. "--initial-cluster bench=http://127.0.0.1:%d >%s/etcd.log 2>&1 & echo $!"):format(
      cpus and "taskset -c " .. cpus .. " " or "", dir, ep, ep, peer, peer, peer, dir)))
  assert(pid, "etcd did not start")
  local pidfile = os.getenv("ETCD3_SPEC_PIDFILE")
  local f = pidfile and io.open(pidfile, "a")
  if f then f:write(pid, "\n"); f:close() end
  helper.wait_for(function()
    return sh("ETCDCTL_API=3 etcdctl --endpoints=" .. ep .. " endpoint health >/dev/null 2>&1")
  end, 20, "etcd")
  return { endpoint = ep, pid = pid, dir = dir }
end

--- Stops the member start_etcd started, by its PID, and removes its data dir.
function _M.stop_etcd(e)
  sh("kill " .. e.pid .. " 2>/dev/null")
  helper.wait_for(function() return not sh("kill -0 " .. e.pid .. " 2>/dev/null") end, 10, "etcd to stop")
  sh("rm -rf " .. q(e.dir))
end

return _M

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

--- etcd's own CPU time in µs, all its threads (the first field of each
-- thread's schedstat is its time on a CPU in ns; Go keeps its threads).
function _M.etcd_cpu_us(e)
  local total = 0
  for ns in capture(("cat /proc/%d/task/*/schedstat 2>/dev/null"):format(e.pid)):gmatch("(%d+) %d+ %d+") do
    total = total + tonumber(ns)
  end
  return total / 1000
end

--- Builds bench/peers/peersbench.go into OUT (an absolute path) in GOPATH
-- mode, offline, from Debian's golang-etcd-server-dev; returns the binary's
-- path (not rebuilt while newer than the source), or nil when it did not
-- build (OUT/go-build.log says why).
function _M.build_go(out)
  local bin = out .. "/peersbench-go"
  local src = out .. "/gopath/src/peersbench"
  sh("mkdir -p " .. src .. " && cp bench/peers/peersbench.go " .. src .. "/main.go")
  if sh(("[ %s -nt bench/peers/peersbench.go ]"):format(bin)) then return bin end
  io.stderr:write("building the Go clientv3 driver (GOPATH mode, Debian's golang-etcd-server-dev)\n")
  local ok = sh(("cd %s && GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH=%s/gopath:/usr/share/gocode "
    .. "GOCACHE=%s/gocache go build -o %s . >%s/go-build.log 2>&1"):format(src, out, out, bin, out))
  return ok and bin or nil
end

--- The command running bench/lua_driver.lua under `lua` (lua5.4, luajit)
-- with the module built in ROOT/build/LUA, against `endpoint`, with `args`.
function _M.lua_driver_command(root, lua, endpoint, args)
  return ("env LUA_PATH=%s LUA_CPATH=%s %s bench/lua_driver.lua -endpoint %s %s"):format(
    q(root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua"), q(root .. "/build/" .. lua .. "/?.so"), lua, endpoint, args)
end

--- "CPU model, N cores, kernel, etcd version, date" for a table's header.
function _M.machine()
  local cpu = capture("grep -m1 'model name' /proc/cpuinfo"):match(":%s*(.-)%s*$") or "?"
  return ("%s, %s cores, %s, etcd %s, %s"):format(cpu, capture("nproc"):gsub("%s", ""),
    capture("uname -sr"):gsub("%s+$", ""), (capture("etcd --version"):match("etcd Version: (%S+)") or "?"),
    os.date("!%Y-%m-%d %H:%M UTC"))
end

--- The load average over 1, 5 and 15 minutes, as one string.
function _M.loadavg()
  local f = io.open("/proc/loadavg")
  local l = f and f:read("l") or ""
  if f then f:close() end
  return l:match("^(%S+ %S+ %S+)") or "?"
end

--- A flat table of numbers and strings as one JSON line (keys sorted).
function _M.json(r)
  local parts = {}
  for k, v in pairs(r) do parts[#parts + 1] = ("%q:%s"):format(k, type(v) == "number" and v or ("%q"):format(v)) end
  table.sort(parts)
  return "{" .. table.concat(parts, ",") .. "}"
end

--- One JSON line of the drivers (a flat object of numbers and strings).
function _M.parse(line)
  local t = {}
  for k, v in line:gmatch('"([%w_]+)"%s*:%s*("?[^,}]*)') do
    if v:sub(1, 1) == '"' then t[k] = v:sub(2, -2) else t[k] = tonumber(v) end
  end
  return t
end

--- The median of a list of numbers, then its min and max (nil when empty).
function _M.stats(list)
  if #list == 0 then return nil end
  local s = {}
  for i, v in ipairs(list) do s[i] = v end
  table.sort(s)
  local m = (#s + 1) / 2
  return (s[math.floor(m)] + s[math.ceil(m)]) / 2, s[1], s[#s]
end

--- "median× (min–max)" of a list of per-pair ratios ("" when empty).
function _M.fmt_ratio(list)
  local m, lo, hi = _M.stats(list)
  if not m then return "" end
  return ("%.2f× (%.2f–%.2f)"):format(m, lo, hi)
end

--- Prints `text` and writes it to `path` (a benchmark's table, kept
-- beside its raw figures).
function _M.publish(text, path)
  print(text)
  local f = assert(io.open(path, "w"))
  f:write(text, "\n")
  f:close()
end

--- Stops the member start_etcd started, by its PID, and removes its data dir.
function _M.stop_etcd(e)
  sh("kill " .. e.pid .. " 2>/dev/null")
  helper.wait_for(function() return not sh("kill -0 " .. e.pid .. " 2>/dev/null") end, 10, "etcd to stop")
  sh("rm -rf " .. q(e.dir))
end

return _M

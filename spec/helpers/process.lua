--- Other processes for the recipe specs: etcdctl in the background, Lua
-- children in this runtime, and coroutines that wait cooperatively, so one
-- spec can hold a lock while another party waits for it. Every process is
-- stopped by the PID this helper started.
local helper = require "spec.helpers.etcd"
local core = require "etcd3.core"
local etcd3 = require "etcd3"

local _M = {}

local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
_M.quote = quote

--- Starts the shell command `command` (which must `exec` its program, so
-- the PID is the program's) in the background, its output going to a temp
-- file; returns { pid, out = path }.
function _M.spawn(command)
  local out = helper.capture("mktemp /tmp/etcd3-spec-ctl.XXXXXX"):gsub("%s+$", "")
  local pid = tonumber(helper.capture(command .. " >" .. out .. " 2>&1 </dev/null & echo $!"))
  assert(pid, "the process did not start: " .. command)
  helper.record_pid(pid)
  return { pid = pid, out = out }
end

--- Starts `etcdctl <args>` against `member` in the background (see spawn).
function _M.etcdctl(member, args)
  return _M.spawn("ETCDCTL_API=3 exec etcdctl " .. member:etcdctl_flags() .. " " .. args)
end

--- The process's state letter in /proc ("R", "S", "T" when stopped, "Z"),
-- nil when there is no such process.
function _M.state(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local stat = f:read("*a")
  f:close()
  return stat:match("^%d+ %b() (%a)")
end

--- Whether the process still runs (a zombie left for its reaper does not).
--- How often the main thread of process `pid` went to sleep and was woken
-- (its voluntary context switches).
function _M.main_thread_wakes(pid)
  local f = assert(io.open(("/proc/%d/task/%d/status"):format(pid, pid)))
  local status = f:read("*a")
  f:close()
  return tonumber(status:match("voluntary_ctxt_switches:%s*(%d+)"))
end

function _M.running(pid)
  local state = _M.state(pid)
  return state ~= nil and state ~= "Z"
end

--- Everything the process wrote so far.
function _M.output(p)
  local f = io.open(p.out)
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

--- Stops the process: SIGINT (etcdctl then unlocks or resigns), SIGKILL
-- if it did not exit within `timeout`; removes its output file.
function _M.stop(p, timeout)
  if _M.running(p.pid) then
    helper.sh("kill -INT " .. p.pid)
    local deadline = core.now() + (timeout or 10)
    while _M.running(p.pid) and core.now() < deadline do core.sleep(0.05) end
    if _M.running(p.pid) then helper.sh("kill -KILL " .. p.pid) end
  end
  local out = _M.output(p)
  os.remove(p.out)
  return out
end

--- Runs `script` in a child process of this runtime; returns a pipe whose
-- output ends with "exit=<status>".
function _M.lua(script)
  return assert(io.popen(helper.lua_command(script) .. " 2>&1; echo exit=$?"))
end

--- A client whose calls yield when made inside a coroutine (and wait in
-- place otherwise): a coroutine can wait for a lock while the spec acts.
function _M.cooperative_client(endpoint, opts)
  local config = { endpoints = endpoint, wait = function(_, timeout, op)
    if coroutine.isyieldable() then
      coroutine.yield()
    else
      op:wait(math.min(timeout, 0.05))
    end
  end }
  for k, v in pairs(opts or {}) do config[k] = v end
  return assert(etcd3.new(config))
end

local unpack = table.unpack or unpack -- luacheck: ignore
local function pack(...) return { n = select("#", ...), ... } end

--- A task: fn running in a coroutine, advanced by task:step().
function _M.task(fn)
  local co = coroutine.create(fn)
  local task = {}
  --- Resumes it once; true once it finished (task.results holds what fn
  -- returned).
  function task.step()
    if coroutine.status(co) == "dead" then return true end
    local r = pack(coroutine.resume(co))
    assert(r[1], r[2])
    if coroutine.status(co) == "dead" then
      task.results = pack(unpack(r, 2, r.n))
      return true
    end
    return false
  end
  --- Steps until it finishes; fails after `timeout` seconds.
  function task.finish(timeout)
    local deadline = core.now() + (timeout or 30)
    while not task.step() do
      assert(core.now() < deadline, "the task did not finish in time")
      core.sleep(0.002)
    end
    return unpack(task.results, 1, task.results.n)
  end
  --- Steps until cond() holds (the task must not finish meanwhile).
  function task.until_(cond, timeout, what)
    helper.wait_for(function()
      assert(not task.step(), "the task finished while " .. (what or "waiting"))
      return cond()
    end, timeout or 20, what)
  end
  return task
end

--- The keys under `prefix`, in creation order.
function _M.keys_under(cli, prefix)
  local out = {}
  for i, kv in ipairs(assert(cli:get(prefix, { prefix = true, sort_target = "create" })).kvs) do out[i] = kv.key end
  return out
end

--- Fails unless `fn(...)` raises an error matching `pattern`.
function _M.raises(pattern, fn, ...)
  local ok, err = pcall(fn, ...)
  if ok then error("no error was raised (expected " .. pattern .. ")", 2) end
  if not tostring(err):find(pattern) then
    error(("the error %q does not match %q"):format(tostring(err), pattern), 2)
  end
end

return _M

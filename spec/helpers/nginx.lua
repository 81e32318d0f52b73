--- Debian's nginx with lua-nginx-module (LuaJIT), for the OpenResty specs:
-- started on 127.0.0.1 with a config written to a temp dir, stopped by the
-- PID this helper started.
local helper = require "spec.helpers.etcd"

local _M = {}

local Nginx = {}
Nginx.__index = Nginx

local MODULES = "/usr/lib/nginx/modules"

--- A temp dir with a readable copy of the Lua layer, the examples and the
-- LuaJIT build:
-- nginx workers run as nobody when started by root (the checkout may sit
-- in a private dir). `bare`: the dir holds the logs only, nothing of the
-- checkout.
-- The sanitized run gives nginx the instrumented LuaJIT build of the
-- module (ETCD3_SPEC_NGX_BUILD) and starts it with the ASan runtime
-- preloaded (its workers are forks of the master: they have it too).
local NGX_BUILD = os.getenv("ETCD3_SPEC_NGX_BUILD")

local function prepare(bare)
  local dir = helper.capture("mktemp -d /tmp/etcd3-nginx.XXXXXX"):gsub("%s+$", "")
  if bare then
    assert(helper.sh(("mkdir -p %s/logs && chmod -R a+rX %s"):format(dir, dir)))
  else
    local root = helper.capture("pwd"):gsub("%s+$", "")
    local build = NGX_BUILD or "build/luajit"
    assert(helper.sh(("mkdir -p %s/lib/etcd3 %s/logs && cp -r %s/lua %s/examples %s "
      .. "&& cp %s/%s/etcd3/core.so %s/lib/etcd3/ && chmod -R a+rX %s")
      :format(dir, dir, root, root, dir, root, build, dir, dir)))
  end
  return dir, helper.free_port()
end

--- Writes `conf` (`${PORT}`, `${LUA_PATH}`, `${LUA_CPATH}` replaced, and
-- `${ROOT}`: the dir holding the copies of lua/ and examples/),
-- starts nginx on it with `flags` (after `env`, a command nginx runs
-- under, as `env -i PATH=...`), waits until it answers on `/`.
local function launch(dir, port, conf, flags, env)
  if NGX_BUILD and helper.sanitized and not env then
    -- (the workers run as nobody: their reports go to a dir they can
    -- write, which stop() reads)
    assert(helper.sh(("mkdir -m 1777 %s/san"):format(dir)))
    env = ("env %s:log_path=%s/san/asan UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=%s/san/ubsan")
      :format(helper.child_env, dir, dir)
  end
  conf = conf:gsub("%${([%u_]+)}", {
    PORT = tostring(port),
    LUA_PATH = ("%s/lua/?.lua;%s/lua/?/init.lua;;"):format(dir, dir),
    LUA_CPATH = ("%s/lib/?.so;;"):format(dir),
    ROOT = dir,
  })
  local f = assert(io.open(dir .. "/nginx.conf", "w"))
  f:write(conf)
  f:close()
  local pid = assert(tonumber(helper.capture(("%s nginx -p %s -c %s/nginx.conf %s >%s/stderr.log 2>&1 & echo $!"):format(
    env or "", dir, dir, flags, dir))))
  local file = os.getenv("ETCD3_SPEC_PIDFILE")
  if file then
    local pf = io.open(file, "a")
    if pf then pf:write(pid, "\n"); pf:close() end
  end
  local self = setmetatable({ dir = dir, port = port, pid = pid, url = "http://127.0.0.1:" .. port }, Nginx)
  helper.wait_for(function()
    return helper.sh("curl -s -o /dev/null " .. self.url .. "/ 2>/dev/null")
  end, 10, "nginx to listen")
  return self
end

local LOAD_MODULES = "load_module " .. MODULES .. "/ndk_http_module.so;\n"
  .. "load_module " .. MODULES .. "/ngx_http_lua_module.so;\n"

--- Starts nginx with `workers` worker processes (default 1). `http` is
-- the body of the http {} block; `${PORT}` in it is replaced by the port
-- it listens on.
function _M.start(http, workers)
  local dir, port = prepare()
  local conf = table.concat({
    LOAD_MODULES,
    "worker_processes " .. (workers or 1) .. ";",
    "daemon off;",
    "master_process on;",
    "pid " .. dir .. "/nginx.pid;",
    "error_log " .. dir .. "/error.log info;",
    "events { worker_connections 64; }",
    "http {",
    "  access_log off;",
    "  client_body_temp_path " .. dir .. "/body;",
    "  proxy_temp_path " .. dir .. "/proxy;",
    "  fastcgi_temp_path " .. dir .. "/fastcgi;",
    "  uwsgi_temp_path " .. dir .. "/uwsgi;",
    "  scgi_temp_path " .. dir .. "/scgi;",
    "  lua_package_path '${LUA_PATH}';",
    "  lua_package_cpath '${LUA_CPATH}';",
    http,
    "}",
  }, "\n")
  return launch(dir, port, conf, "")
end

--- Starts nginx on a complete configuration, as a user writes it (the
-- lua module is loaded in front of it; foreground mode, pid file and error
-- log come from the command line). `${PORT}`, `${LUA_PATH}` and
-- `${LUA_CPATH}` in it are replaced. `bare`: nothing of the checkout is
-- on any path (no copies, `${LUA_PATH}` unused), and nginx runs with an
-- empty environment but PATH (LUA_PATH and LUA_CPATH would be the
-- defaults that ";;" stands for).
function _M.start_conf(conf, bare)
  local dir, port = prepare(bare)
  return launch(dir, port, LOAD_MODULES .. conf, ("-g 'daemon off; master_process on; pid %s/nginx.pid; "
    .. "error_log %s/error.log info;'"):format(dir, dir), bare and "env -i PATH=/usr/sbin:/usr/bin:/bin")
end

--- GET path -> body, seconds taken
function Nginx:get(path, max_time)
  local out = helper.capture(("curl -s --max-time %d -w '\\n%%{time_total}' %s%s"):format(
    max_time or 10, self.url, path))
  local body, took = out:match("^(.*)\n([%d%.]+)$")
  return body, tonumber(took)
end

--- Starts a GET in the background; returns a function that waits for it
-- and gives the body.
function Nginx:get_async(path, max_time)
  -- (never with the sanitizer run's LD_PRELOAD: curl hangs under it)
  local pipe = io.popen(("unset LD_PRELOAD; curl -s --max-time %d %s%s"):format(max_time or 10, self.url, path))
  return function()
    local body = pipe:read("*a")
    pipe:close()
    return body
  end
end

--- The PIDs of this nginx: its master and the master's children.
function Nginx:pids()
  local pids = { [self.pid] = true }
  for pid in helper.capture("ps -o pid= --ppid " .. self.pid):gmatch("%d+") do pids[tonumber(pid)] = true end
  return pids
end

--- `n` GETs of path, each on a new connection (reuseport spreads them
-- over the workers), each answer starting with the worker's id ->
-- { [worker id] = { [the rest of a line] = true } }.
function Nginx:ask_all(path, n)
  local urls = {}
  for i = 1, n do urls[i] = "'" .. self.url .. path .. "'" end
  local out = helper.capture("curl -s --max-time 10 -H 'Connection: close' " .. table.concat(urls, " "))
  local seen = {}
  for id, rest in out:gmatch("(%d+) ([^\n]*)") do
    seen[tonumber(id)] = seen[tonumber(id)] or {}
    seen[tonumber(id)][rest] = true
  end
  return seen
end

--- GET path: a location that prints what each bad call raised; every one
-- of `messages` must be in the body (plain text), "no error" nowhere.
function Nginx:refuses(path, messages)
  local body = self:get(path)
  for _, message in ipairs(messages) do
    if not body:find(message, 1, true) then error(("%q not in:\n%s"):format(message, body), 2) end
  end
  if body:find("no error", 1, true) then error("a bad call raised nothing:\n" .. body, 2) end
end

function Nginx:error_log()
  local f = io.open(self.dir .. "/error.log")
  if not f then return "" end
  local text = f:read("*a")
  f:close()
  return text
end

function Nginx:stop()
  if self.pid then
    helper.stop_process(self.pid, "QUIT", 10)
    self.pid = nil
  end
  local reports = NGX_BUILD and helper.capture(("cat %s/san/* 2>/dev/null"):format(self.dir)) or ""
  if self.dir:match("^/tmp/") then helper.sh("rm -rf '" .. self.dir .. "'") end
  if reports ~= "" then error("the sanitizers reported in nginx:\n" .. reports, 2) end
end

--- Changes made while a mirror's writer is stopped, then a compaction:
-- opts { pid = the writer, resume = "CONT"|"KILL", member, cli,
-- changes = function() … end (the changes), restart = true (etcd is
-- restarted too: the writer's watch ends and resumes from a compacted
-- revision), key, value (the last put) }. The writer is resumed (or
-- killed) even when a step fails. -> the last put's revision
function _M.compacted_while_stopped(opts)
  assert(helper.sh("kill -STOP " .. opts.pid))
  local ok, err = pcall(function()
    opts.changes()
    if opts.restart then
      opts.member:kill()
      opts.member:start()
      opts.member:wait_healthy()
    end
    local last
    helper.wait_for(function()
      local res = opts.cli:put(opts.key, opts.value)
      last = res and res.header.revision
      return last
    end, 20, "the put after etcd's restart")
    assert(opts.cli:compact(last, { physical = true }))
    return last
  end)
  assert(helper.sh(("kill -%s %d"):format(opts.resume, opts.pid)))
  assert(ok, err)
  return err
end

--- Ends what a spec started, in the order given (an nginx before the
-- clients and members its workers use): each present one is stopped
-- (:stop()) or closed (:close()); nil ones are skipped.
function _M.stop_all(...)
  for i = 1, select("#", ...) do
    local thing = select(i, ...)
    if thing then
      if thing.stop then thing:stop() else thing:close() end
    end
  end
end

return _M

-- usage: lua5.4 tools/openresty-tree.lua PREFIX   (from the checkout, with
-- ETCDCTL_ENDPOINTS naming an etcd; tools/check-openresty-tree.sh runs it)
--
-- PREFIX stands for /usr/local/openresty, with lua-etcd3 installed by
-- LuaRocks into PREFIX/luajit. Debian's nginx with lua-nginx-module runs a
-- config whose only Lua paths are README.md's lua_package_path and
-- lua_package_cpath lines for OpenResty's tree (PREFIX for
-- /usr/local/openresty), in an empty environment, nothing of the
-- checkout on any path. In a worker, etcd3, etcd3.ngx and etcd3.core
-- must load from PREFIX (found there, their functions' source there, the
-- .so mapped from there), and a put, a get and a watch work. Prints what
-- the worker answered; fails on anything else.
local nginx = require "spec.helpers.nginx"

local prefix = assert(arg[1], "usage: lua5.4 tools/openresty-tree.lua PREFIX")
local endpoint = assert(os.getenv("ETCDCTL_ENDPOINTS"), "ETCDCTL_ENDPOINTS is not set")

local f = assert(io.open("README.md"))
local readme = f:read("a")
f:close()
local lines = {}
for line in readme:gmatch("\n%s*(lua_package_c?path%s+\"/usr/local/openresty/[^\n]*)") do
  lines[#lines + 1] = "  " .. line:gsub("/usr/local/openresty/", (prefix:gsub("%%", "%%%%")) .. "/")
end
assert(#lines == 2 and lines[1]:find("lua_package_path", 1, true) and lines[2]:find("lua_package_cpath", 1, true),
  "README.md: one lua_package_path and then one lua_package_cpath line for /usr/local/openresty expected")

-- in the worker: every failure is said as "FAILED: …"
local check = [==[
  local prefix = ]==] .. ("%q"):format(prefix) .. [==[
  local function from(what, file)
    if type(file) ~= "string" or file:sub(1, #prefix + 1) ~= prefix .. "/" then
      error(what .. ": " .. tostring(file) .. ", not from " .. prefix, 0)
    end
    ngx.say(what, ": PREFIX", file:sub(#prefix + 1))
  end
  -- the source file of every Lua function of a module table
  local function sources(what, t)
    local n = 0
    for name, v in pairs(t) do
      if type(v) == "function" then
        local s = debug.getinfo(v, "S").source
        if s:sub(1, 1) == "@" then
          n = n + 1
          local file = s:sub(2)
          if file:sub(1, #prefix + 1) ~= prefix .. "/" then
            error(what .. "." .. name .. " defined in " .. file, 0)
          end
        end
      end
    end
    if n == 0 then error(what .. ": no Lua function", 0) end
    ngx.say(what, ": ", n, " functions defined under PREFIX")
  end
  local ok, err = pcall(function()
    local etcd3 = require "etcd3"
    local etcd3_ngx = require "etcd3.ngx"
    from("etcd3 found", package.searchpath("etcd3", package.path))
    from("etcd3.ngx found", package.searchpath("etcd3.ngx", package.path))
    from("etcd3.core found", package.searchpath("etcd3.core", package.cpath))
    sources("etcd3", etcd3)
    sources("etcd3.ngx", etcd3_ngx)
    local maps = assert(io.open("/proc/self/maps"))
    local mapped = maps:read("*a"):match("(/%S*/etcd3/core%.so)\n")
    maps:close()
    from("etcd3.core mapped", mapped)
    ngx.say(etcd3._VERSION)
    local cli = assert(package.loaded["tree.cli"])
    local key = "/openresty-tree/" .. ngx.worker.pid()
    local put = assert(cli:put(key, "one"))
    local w = assert(cli:watch(key, { start_revision = put.header.revision }))
    local ev = assert(w:next(10))
    assert(ev.kv.value == "one", "watch: " .. tostring(ev.kv.value))
    assert(cli:put(key, "two"))
    ev = assert(w:next(10))
    assert(ev.kv.value == "two", "watch: " .. tostring(ev.kv.value))
    w:cancel()
    local got = assert(cli:get(key))
    assert(got.kvs[1].value == "two", "get: " .. tostring(got.kvs[1] and got.kvs[1].value))
    ngx.say("put, get, watch: ok")
    -- for the log: what the documented lines' ";;" brought (Debian's
    -- defaults, where lua-resty-core is found)
    ngx.say("resty.core found: ", tostring(package.searchpath("resty.core", package.path)))
  end)
  if not ok then ngx.say("FAILED: ", tostring(err)) end
]==]

local conf = table.concat({
  "worker_processes 1;",
  "events { worker_connections 64; }",
  "http {",
  table.concat(lines, "\n"),
  "  init_worker_by_lua_block {",
  ("    package.loaded[\"tree.cli\"] = assert(require(\"etcd3\").new { endpoints = %q, timeout = 10 })")
    :format(endpoint),
  "  }",
  "  server {",
  "    listen 127.0.0.1:${PORT};",
  "    location = / { return 200 \"up\"; }",
  "    location = /check { content_by_lua_block {",
  check,
  "    } }",
  "  }",
  "}",
}, "\n")

local server = nginx.start_conf(conf, true)
local ok, err = pcall(function()
  print("nginx.conf's Lua paths (PREFIX = " .. prefix .. "):")
  print(table.concat(lines, "\n"))
  local body = server:get("/check", 60)
  print("the worker says:")
  io.write(body or "(nothing)\n")
  assert(body and not body:find("FAILED", 1, true) and body:find("put, get, watch: ok", 1, true), "the check failed")
  local log = server:error_log()
  for _, bad in ipairs { "%[error%]", "%[alert%]", "%[emerg%]", "fall back to polling" } do
    assert(not log:find(bad), "nginx's error.log has " .. bad .. ":\n" .. log)
  end
end)
server:stop()
assert(ok, err)
print("== openresty-tree: nginx ok")

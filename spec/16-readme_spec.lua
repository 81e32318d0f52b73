-- Doc-tests: every ```lua fence of README.md runs, each in its own process
-- of this runtime (so on Lua 5.4 and on LuaJIT, as busted runs this file),
-- against throwaway etcd members started for it; every ```nginx fence runs
-- in a real nginx (spec/helpers/nginx.lua, LuaJIT). A fence added to the
-- README is picked up as it is: every ```lua and ```nginx fence runs
-- unless its annotation says why not.
--
-- How an example runs. Its text is written to $tmp/README.md at the same
-- line numbers as in README.md (so an error names the README's line), with
-- on line 1 a prelude that makes what the README's first example makes:
--   local etcd3 = require "etcd3"; local cli = assert(etcd3.new {...})
-- (with the TLS files or root's credentials for those members), and
-- `lua5.4|luajit $tmp/README.md` runs in the checkout with this run's
-- LUA_PATH/LUA_CPATH (and LD_PRELOAD in the sanitizer run), under
-- `timeout`. It passes when it exits with status 0.
--
-- Endpoints. The text says 127.0.0.1:2379 (and :22379, :32379 for a
-- second and third member, as etcd's own examples do); each becomes the
-- endpoint of a member started for this example (or 127.0.0.1:1, where
-- nothing listens, when the example has fewer members), and the process
-- gets ETCDCTL_ENDPOINTS naming them all, so `etcd3.new {}` finds them too.
-- 127.0.0.1:2380 (a peer URL) becomes a free port.
--
-- Annotation. An HTML comment just before the fence (blank lines may
-- separate them), hidden when the README is rendered, is a Lua table:
--   <!-- doctest { etcd = "auth", setup = [[ … ]], check = [[ … ]] } -->
-- Fields (any other raises):
--   etcd     "single" (default): one fresh member; "auth": one member with
--            auth enabled, user root, password in $ETCD_PASSWORD; "tls": one
--            member that demands client certificates, the text's
--            /etc/etcd/ca.pem, client.pem, client-key.pem becoming the test
--            CA and client pair (the server certificate names 127.0.0.1 and
--            etcd.internal); "cluster3": three members.
--   setup    Lua run just before the example, in the same chunk (its locals
--            are the example's); check: Lua run after it (sees the
--            example's locals). Bounds for examples meant to run forever go
--            here (spec/helpers/doctest.lua), never in the text.
--   sub      { [text] = replacement }: more replacements in the text;
--            "${tmp}" in a replacement is this example's temp dir.
--   only     "lua5.4: why": run on that runtime only.
--   skip     "why": not run (reported as pending with the reason).
--   get      nginx fences: { [path] = expected body }. The fence's
--            `location` blocks go into a server {} listening on a free
--            port, the rest into http {}; `setup` runs first, in a Lua
--            process as above.
--   timeout  seconds the process may take (default 60).
local helper = require "spec.helpers.etcd"
local certs_helper = require "spec.helpers.certs"

local INTERP = jit and "luajit" or "lua5.4"
local FIELDS = { etcd = "string", setup = "string", check = "string", sub = "table", only = "string",
  skip = "string", get = "table", timeout = "number" }
local KINDS = { single = 1, auth = 1, tls = 1, cluster3 = 3 }
local ROOT_PW = "doctest-r00t"

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function read(path)
  local f = io.open(path)
  if not f then return nil end
  local text = f:read("*a")
  f:close()
  return text
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

--- README.md -> { { line, lang, lines, note, heading, note_line } } for
-- every ```lua and ```nginx fence.
local function examples()
  local lines = {}
  for l in assert(read("README.md"), "README.md not found (run from the checkout)"):gmatch("([^\n]*)\n?") do
    lines[#lines + 1] = l
  end
  local found, heading, i = {}, "", 1
  while i <= #lines do
    local l = lines[i]
    local h = l:match("^#+%s+(.*)$")
    if h then heading = h end
    local indent, lang = l:match("^(%s*)```(%w*)%s*$")
    if lang then
      -- a fence may be indented (in a list item): its lines lose that indent
      local body, j = {}, i + 1
      while j <= #lines and not lines[j]:match("^%s*```%s*$") do
        body[#body + 1] = lines[j]:sub(1, #indent) == indent and lines[j]:sub(#indent + 1) or lines[j]
        j = j + 1
      end
      if lang == "lua" or lang == "nginx" then
        -- the annotation: an HTML comment ending just above (blank lines between)
        local k = i - 1
        while k > 0 and lines[k]:match("^%s*$") do k = k - 1 end
        local note, note_line
        if k > 0 and lines[k]:match("%-%->%s*$") then
          local s = k
          while s > 0 and not lines[s]:find("<!--", 1, true) do s = s - 1 end
          local comment = table.concat(lines, "\n", s, k)
          local text = comment:match("^%s*<!%-%-%s*doctest%s*(.-)%s*%-%->%s*$")
          if text then note, note_line = text, s end
        end
        found[#found + 1] = { line = i + 1, lang = lang, lines = body, note = note, note_line = note_line,
          heading = heading }
      end
      i = j
    end
    i = i + 1
  end
  return found
end

--- The annotation's table; a bad one fails the example.
local function parse_note(ex)
  if not ex.note then return {} end
  -- a table constructor, evaluated with no globals
  local name, env = "=README.md:" .. ex.note_line, {}
  local chunk, err
  if setfenv then
    chunk, err = loadstring("return " .. ex.note, name)
    if chunk then setfenv(chunk, env) end
  else
    chunk, err = load("return " .. ex.note, name, "t", env)
  end
  assert(chunk, err)
  local ok, t = pcall(chunk)
  assert(ok and type(t) == "table", "README.md:" .. ex.note_line .. ": doctest annotation: a Lua table expected")
  for k, v in pairs(t) do
    assert(FIELDS[k], ("README.md:%d: doctest annotation: unknown field '%s'"):format(ex.note_line, tostring(k)))
    assert(type(v) == FIELDS[k], ("README.md:%d: doctest annotation: '%s' must be a %s"):format(
      ex.note_line, k, FIELDS[k]))
  end
  assert(KINDS[t.etcd or "single"], "README.md:" .. ex.note_line .. ": unknown etcd '" .. tostring(t.etcd) .. "'")
  return t
end

local certs -- made once, for the first "tls" example
local killed = {} -- members to wait for and remove in teardown

--- Starts the members an example needs: { endpoints, prelude, env, stop }.
local function start_etcd(kind)
  local opts, prelude_config, env = {}, "{}", {}
  if kind == "tls" then
    certs = certs or certs_helper.make()
    opts.tls = { cert = certs.server_cert, key = certs.server_key, ca = certs.ca, client_auth = true,
      client_cert = certs.client_cert, client_key = certs.client_key }
    prelude_config = ("{ tls = { ca = %q, cert = %q, key = %q } }"):format(certs.ca, certs.client_cert,
      certs.client_key)
  end
  local cluster = helper.cluster(KINDS[kind], opts)
  if kind == "auth" then
    local admin = assert(require("etcd3").new { endpoints = cluster.endpoints })
    assert(admin:user_add("root", ROOT_PW))
    assert(admin:user_grant_role("root", "root"))
    assert(admin:auth_enable())
    admin:close()
    env.ETCD_PASSWORD = ROOT_PW
    prelude_config = '{ user = "root", password = os.getenv("ETCD_PASSWORD") }'
  end
  local endpoints = {}
  for i, m in ipairs(cluster.members) do endpoints[i] = m.endpoint end
  env.ETCDCTL_ENDPOINTS = table.concat(cluster.endpoints, ",")
  -- killed at once; waited for and removed in teardown (saves seconds each)
  local function stop()
    for _, m in ipairs(cluster.members) do
      m:signal("KILL")
      killed[#killed + 1] = m
    end
  end
  return {
    endpoints = endpoints, env = env, stop = stop,
    prelude = 'local etcd3 = require "etcd3"; local cli = assert(etcd3.new ' .. prelude_config .. ")",
  }
end

--- The example's text with the endpoints, peer URL and `sub` replaced.
local function substitute(text, etcd, note, tmp)
  local ports = { "2379", "22379", "32379" }
  for i, port in ipairs(ports) do
    text = text:gsub("127%.0%.0%.1:" .. port .. "%f[%D]", etcd.endpoints[i] or "127.0.0.1:1")
  end
  text = text:gsub("127%.0%.0%.1:2380%f[%D]", function() return "127.0.0.1:" .. helper.free_port() end)
  if note.etcd == "tls" then
    text = text:gsub("/etc/etcd/ca%.pem", certs.ca):gsub("/etc/etcd/client%-key%.pem", certs.client_key)
      :gsub("/etc/etcd/client%.pem", certs.client_cert)
  end
  for from, to in pairs(note.sub or {}) do
    local start = text:find(from, 1, true)
    assert(start, "doctest sub: '" .. from .. "' is not in the example")
    to = to:gsub("%${tmp}", tmp)
    text = text:sub(1, start - 1) .. to .. text:sub(start + #from)
  end
  return text
end

--- Runs `chunk` (line-aligned with README.md) in a process of this
-- runtime; returns ok, output.
local function run_lua(chunk, env, tmp, timeout)
  write(tmp .. "/README.md", chunk)
  local vars = { "DOCTEST_TMP=" .. q(tmp) }
  for k, v in pairs(env) do vars[#vars + 1] = k .. "=" .. q(v) end
  -- the sanitizer run's LD_PRELOAD is for the Lua process only, never the shell tools
  local cmd = ("unset LD_PRELOAD; LUA_PATH=%s LUA_CPATH=%s %s timeout -k 5 %d env %s %s %s 2>&1; "
    .. "echo \"exit $?\""):format(q(package.path), q(package.cpath), table.concat(vars, " "), timeout,
    helper.child_env, INTERP, q(tmp .. "/README.md"))
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  local status = tonumber(out:match("exit (%d+)\n?$"))
  return status == 0, out
end

--- Lua text placed at README.md's line numbers: { [line] = text }.
local function place(chunks)
  local out, last = {}, 0
  for line in pairs(chunks) do if line > last then last = line end end
  for i = 1, last do out[i] = chunks[i] or "" end
  return table.concat(out, "\n") .. "\n"
end

--- Stops the etcd processes an example's set-up started
-- (spec/helpers/doctest.lua lists them by PID and data dir).
local function stop_started(tmp)
  for pid, dir in (read(tmp .. "/members") or ""):gmatch("(%d+) (%S+)") do
    if (read("/proc/" .. pid .. "/cmdline") or ""):match("^etcd") then
      helper.sh("kill -9 " .. pid)
      helper.wait_for(function() return not helper.sh("kill -0 " .. pid .. " 2>/dev/null") end, 10, "etcd to exit")
    end
    if dir:match("^/tmp/etcd3%-spec%.") then helper.sh("rm -rf " .. q(dir)) end
  end
end

--- Places the lines of `text` from README.md's line `first` on.
local function add_lines(chunks, first, text)
  local n = 0
  for l in (text .. "\n"):gmatch("([^\n]*)\n") do
    assert(not chunks[first + n], "README.md:" .. (first + n) .. ": set-up longer than its annotation")
    chunks[first + n] = l
    n = n + 1
  end
  return n
end

--- nginx fence: `location` blocks go in a server {}, the rest in http {}.
local function nginx_http(text)
  local http, server, depth, in_server = {}, {}, 0, false
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    if depth == 0 then in_server = line:match("^%s*location%s") ~= nil end
    table.insert(in_server and server or http, line)
    for c in line:gsub("%-%-.*$", ""):gmatch("[{}]") do depth = depth + (c == "{" and 1 or -1) end
  end
  return table.concat(http, "\n") .. "\nserver {\n  listen 127.0.0.1:${PORT};\n" .. table.concat(server, "\n")
    .. "\n}\n"
end

describe("README.md examples", function()
  teardown(function()
    for _, m in ipairs(killed) do m:stop() end
    if certs then certs.remove() end
  end)

  it("finds every ```lua and ```nginx fence", function()
    local n = 0
    for _ in read("README.md"):gmatch("```lua%s*\n") do n = n + 1 end
    for _ in read("README.md"):gmatch("```nginx%s*\n") do n = n + 1 end
    assert.are.equal(n, #examples())
    assert.is_true(n > 0)
  end)

  for _, ex in ipairs(examples()) do
    local name = ("README.md:%d (%s, %s)"):format(ex.line - 1, ex.heading, ex.lang)
    local note_ok, note = pcall(parse_note, ex)
    local only_runtime, only_why = (note_ok and note.only or ""):match("^(%S+):%s*(.+)$")
    if note_ok and note.skip then
      pending(name .. ": " .. note.skip)
    elseif note_ok and note.only and only_runtime ~= INTERP then
      pending(name .. ": " .. (only_why or "'only' must be \"runtime: why\""))
    else
      it(name, function()
        assert(note_ok, note)
        assert(not note.only or only_why, "'only' must be \"runtime: why\"")
        local kind = note.etcd or "single"
        local tmp = helper.capture("mktemp -d /tmp/etcd3-doctest.XXXXXX"):gsub("%s+$", "")
        local etcd = start_etcd(kind)
        local ok, passed, output = pcall(function()
          local text = substitute(table.concat(ex.lines, "\n"), etcd, note, tmp)
          local chunks = { [1] = etcd.prelude }
          if note.setup then add_lines(chunks, ex.note_line + 1, note.setup) end
          if ex.lang == "lua" then
            local n = add_lines(chunks, ex.line, text)
            if note.check then add_lines(chunks, ex.line + n + 1, note.check) end
            return run_lua(place(chunks), etcd.env, tmp, note.timeout or 60)
          end
          -- nginx: the set-up in a Lua process, then the config in nginx
          local sok, sout = run_lua(place(chunks), etcd.env, tmp, note.timeout or 60)
          if not sok then return false, "set-up failed:\n" .. sout end
          assert(note.get, "an nginx example needs get = { [path] = body }")
          local server = require("spec.helpers.nginx").start(nginx_http(text))
          local failures = {}
          for path, want in pairs(note.get) do
            local body = server:get(path)
            if body ~= want then
              failures[#failures + 1] = ("GET %s: %q, expected %q"):format(path, tostring(body), want)
            end
          end
          local log = server:error_log()
          server:stop()
          if #failures > 0 then return false, table.concat(failures, "\n") .. "\nerror.log:\n" .. log end
          return true
        end)
        stop_started(tmp)
        etcd.stop()
        helper.sh("rm -rf " .. q(tmp))
        assert(ok, passed)
        assert(passed, name .. " failed:\n" .. tostring(output))
      end)
    end
  end
end)

-- Memory of one lua-etcd3 process, from /proc/self/status: RSS of the bare
-- interpreter, after `require "etcd3"`, after connecting (new + one get), and
-- for each further 1000 watchers (each on a key of its own, all on the
-- client's one watch stream), then after cancelling them.
--
--   make bench-memory
--   (= lua5.4 tools/with-etcd.lua lua5.4 bench/memory.lua [watchers per step] [steps])
--
-- Lua's own heap (collectgarbage "count") is shown beside RSS, so what the
-- Lua layer holds can be told from what the C module and gRPC hold.
local function status()
  local f = assert(io.open("/proc/self/status"))
  local text = f:read("a")
  f:close()
  local function kb(field) return tonumber(text:match(field .. ":%s*(%d+)")) or 0 end
  return { rss = kb("VmRSS"), anon = kb("RssAnon"), file = kb("RssFile") }
end

local per_step, steps = tonumber(arg[1]) or 1000, tonumber(arg[2]) or 3
local endpoint = arg[3] or os.getenv("ETCDCTL_ENDPOINTS") or error("no endpoint: run under tools/with-etcd.lua")

local rows, last = {}, nil
local function mark(what)
  collectgarbage()
  local s = status()
  s.what, s.lua = what, collectgarbage("count")
  s.delta = last and s.rss - last.rss or 0
  rows[#rows + 1], last = s, s
end

mark("lua5.4, nothing loaded")
local etcd3 = require "etcd3"
mark('require "etcd3"')
local cli = assert(etcd3.new { endpoints = endpoint })
assert(cli:put("memory/probe", "x"))
assert(cli:get("memory/probe"))
mark("connected (new + put + get)")

local ws = {}
for _ = 1, steps do
  for _ = 1, per_step do
    local n = #ws + 1
    ws[n] = assert(cli:watch(("memory/w%08d"):format(n)))
  end
  -- Let the stream settle (etcd's confirmations are in, gRPC's buffers at
  -- their steady size) before reading RSS.
  require("etcd3.core").sleep(1)
  mark(("%d watchers"):format(#ws))
end
for _, w in ipairs(ws) do w:cancel() end
ws = nil -- luacheck: ignore 311 (let the collector have them)
require("etcd3.core").sleep(1)
mark("watchers cancelled, collected")
cli:close()
mark("client closed")

print("| state | VmRSS KB | change KB | RssAnon KB | RssFile KB | Lua heap KB |")
print("|---|---:|---:|---:|---:|---:|")
for _, r in ipairs(rows) do
  print(("| %s | %d | %+d | %d | %d | %.0f |"):format(r.what, r.rss, r.delta, r.anon, r.file, r.lua))
end
